"""benchmarks/access_probe.py: the streaming probe's sums are right for every box shape (CPU: the Triton
interpreter, pointer loads), and a box that does not tile the rows is refused."""

import pytest
import torch

pytest.importorskip("triton")

import access_probe as ap  # benchmarks/ (on the test path)


@pytest.mark.interpreter  # CPU tensors through the Triton probe (a GPU host runs it only with TRITON_INTERPRET=1)
@pytest.mark.parametrize("box", ap.BOXES)
def test_sums_every_box(box):
    # 3 programs of 64 rows x 2048 bytes (the DeepSeek-V3 w2 program; of 128 / 256 rows for the w13 boxes), bytes up
    # to 255: int32 sums, no overflow
    gen = torch.Generator().manual_seed(box[0])
    rows = max(64, box[0])
    w = torch.randint(0, 256, (3 * rows, 2048), dtype=torch.uint8, generator=gen)
    assert torch.equal(ap.stream(w, rows, box, 2, tma=False), ap.reference(w, rows))


def test_refuses_a_box_that_does_not_tile():
    w = torch.zeros(64, 256, dtype=torch.uint8)
    with pytest.raises(ValueError, match="must tile"):
        ap.stream(w, 64, (64, 512), 2, tma=False)
