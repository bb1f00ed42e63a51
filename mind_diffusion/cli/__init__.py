"""Command-line entry points (behind run_train.sh / run_infer.sh) and the config → objects wiring."""
