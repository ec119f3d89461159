"""The split kernel's launch parameters: parsing, the automatic tile, and the split counts they give."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from spotattn.kernels._triton.decode import MAX_SPLITS, DecodeTiling, choose_splits  # noqa: E402


def test_parse_round_trips_and_fills_defaults() -> None:
    assert str(DecodeTiling()) == "autox4:s2:p2"
    assert DecodeTiling.parse("64x8") == DecodeTiling(block_n=64, num_warps=8)
    assert DecodeTiling.parse("autox4:s3:p4") == DecodeTiling(num_stages=3, programs_per_sm=4)
    for text in ("128x4:s2:p2", "16x1:s1:p8"):
        assert str(DecodeTiling.parse(text)) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("64x3", "num_warps must be 1, 2, 4, 8 or 16, got 3"),
        ("48x4", "block_n must be a power of two >= 16, got 48"),
        ("64x4:q2", "unknown field 'q2'"),
        ("64x4:p0", "programs_per_sm must be >= 1"),
        ("64", "use TOKENSxWARPS"),
    ],
)
def test_parse_names_the_bad_field(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DecodeTiling.parse(text)


def test_automatic_tile_by_block_size() -> None:
    auto = DecodeTiling()
    assert [auto.tile(bs) for bs in (16, 32, 64, 128)] == [128, 128, 64, 128]
    assert DecodeTiling(block_n=32).tile(64) == 64  # a tile holds at least one block


@pytest.mark.parametrize("tiling", ["autox4", "16x2:s1:p1", "64x4:s2:p8"])
@pytest.mark.parametrize(("batch_heads", "width"), [(1, 3), (8, 259), (32, 259), (8, 8200), (64, 2048)])
def test_splits_hold_whole_tiles_and_respect_the_cap(tiling: str, batch_heads: int, width: int) -> None:
    t = DecodeTiling.parse(tiling)
    splits = choose_splits(batch_heads, width, 16, torch.device("cpu"), t)
    bpt = t.tile(16) // 16
    assert 1 <= splits <= MAX_SPLITS
    # The launch re-derives whole-tile splits of the width from this count; none of them may come out empty.
    per_split = math.ceil(math.ceil(width / splits) / bpt) * bpt
    assert math.ceil(width / per_split) == splits
    # More programs per SM never means fewer splits.
    more = DecodeTiling(t.block_n, t.num_warps, t.num_stages, 2 * t.programs_per_sm)
    assert choose_splits(batch_heads, width, 16, torch.device("cpu"), more) >= splits


def test_bench_attend_refuses_bad_arguments_before_needing_a_gpu() -> None:
    from click.testing import CliRunner

    from spotattn.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["bench", "attend", "--list-tokens", "10"])
    assert result.exit_code == 2 and "--list-tokens" in result.output and "[4096, 131072]" in result.output
    result = runner.invoke(main, ["bench", "attend", "--tilings", "default,64x3"])
    assert result.exit_code == 2 and "--tilings" in result.output
    assert "num_warps must be 1, 2, 4, 8 or 16" in result.output
