"""The commands' bodies, one module per command, each with ``run(args) -> exit status``; cli.py only parses the
command line and calls ``siamkit.commands.<command>.run``.

Each module imports what its command needs inside ``run``, so that a command line that needs no PyTorch (verify,
identify and embed with an exported .onnx model) never imports it.
"""
