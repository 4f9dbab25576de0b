"""KServe v2 / Open Inference Protocol messages and service stubs, generated from the .proto files here.

The stubs register their descriptors in ``POOL``, a pool of their own rather than protobuf's
default one, so they can live in one process with other copies of the same protocol (such as
the one ``tritonclient`` ships) without symbol clashes. The wire format is what clients see.
Regenerate with ``python -m protos.generate``.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
