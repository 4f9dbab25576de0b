"""Files changed under a running server never change its answers (issue 15, finding 1).

The backbone and every loaded package are read into process memory at load: overwriting a package
in place (as ``cp`` does) or truncating it or the backbone file leaves the served logits, and the
process, as they were. Only a reload yields a new version.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from runtime.core.backbone import Backbone
from tests.conftest import TINY
from tests.server_helpers import make_package, normalized_images, start_server, write_tasks


def infer(client: grpcclient.InferenceServerClient, task_id: str, images: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    return client.infer(task_id, [tensor]).as_numpy("logits")


def test_overwritten_and_truncated_files_change_no_answer(tiny_backbone: Backbone, tmp_path: Path) -> None:
    weights = tiny_backbone.save(tmp_path / "backbone.safetensors")
    backbone = Backbone.create(TINY, weights)
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    first, _ = write_tasks(backbone, task_dir, 2)
    images = normalized_images(2, TINY.img_size, seed=5)
    with (
        start_server(backbone, task_dir, model_control_mode="none") as server,
        grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") as client,
    ):
        before = infer(client, first.task_id, images)
        version = client.get_model_metadata(first.task_id).versions

        package_file = task_dir / f"{first.task_id}.safetensors"
        replacement = make_package(backbone, first.task_id, seed=999).to_bytes()
        with package_file.open("r+b") as handle:  # in place, as cp does: same inode
            handle.truncate(0)
            handle.write(replacement)
        np.testing.assert_array_equal(infer(client, first.task_id, images), before)

        with package_file.open("r+b") as handle:
            handle.truncate(100)
        with Path(weights).open("r+b") as handle:
            handle.truncate(1000)
        np.testing.assert_array_equal(infer(client, first.task_id, images), before)
        assert client.is_server_live()
        assert client.get_model_metadata(first.task_id).versions == version
