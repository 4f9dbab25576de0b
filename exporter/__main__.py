"""``python -m exporter``: task export, ``backbone`` extraction or ``onnx`` export."""

import sys

from exporter.cli import dispatch

sys.exit(dispatch())
