"""``python -m exporter``: task export, ``backbone`` extraction or ``onnx`` export."""

import sys

from exporter.cli import dispatch, exit_on_termination

exit_on_termination()
sys.exit(dispatch())
