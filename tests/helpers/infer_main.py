"""Running ``run_infer``'s program in-process, as the command-line tests do."""
from mind_diffusion.cli import infer


def run_main(argv, capsys):
    """(exit status, stdout, stderr) of infer.main, whether it returns or exits through argparse."""
    try:
        status = infer.main(argv)
    except SystemExit as stop:
        status = stop.code
    out, err = capsys.readouterr()
    return status, out, err
