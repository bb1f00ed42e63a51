"""Custom CPU operators written in C++ (``ops.Custom(func_type="aot")``) and their build."""
