import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from unified.errors import UnifiedError
from unified.layout import MODALITIES, SPECIALS, Segment, TokenLayout


def layout() -> TokenLayout:
    return TokenLayout.build(text=300, image=1024, action=256, state=128)


def test_segments_follow_the_design_order_without_gaps():
    lay = layout()
    starts = [lay.segment(m).start for m in MODALITIES]
    assert starts == sorted(starts) and starts[0] == 0
    assert lay.vocab_size == len(SPECIALS) + 300 + 1024 + 256 + 128
    assert lay.special("<act>") < lay.segment("text").start


@given(st.sampled_from(["text", "image", "action", "state"]), st.lists(st.integers(0, 10_000), max_size=50))
def test_global_local_round_trip(modality, raw):
    lay = layout()
    size = lay.segment(modality).size
    ids = np.array([r % size for r in raw], np.int64)
    global_ids = lay.to_global(modality, ids)
    assert lay.mask(modality)[global_ids].all()
    np.testing.assert_array_equal(lay.to_local(modality, global_ids), ids)


def test_ids_of_another_modality_are_refused():
    lay = layout()
    image_id = int(lay.to_global("image", [5])[0])
    with pytest.raises(UnifiedError, match=f"id {image_id} is 'image', not 'action'"):
        lay.to_local("action", [image_id])
    with pytest.raises(UnifiedError, match="action id 256 outside"):
        lay.to_global("action", [256])
    with pytest.raises(UnifiedError, match="no special token"):
        lay.special("<image>")


def test_overlapping_segments_are_rejected():
    n = len(SPECIALS)
    segments = [Segment("special", 0, n), Segment("text", n, 100), Segment("image", n + 88, 50),
                Segment("action", n + 138, 10), Segment("state", n + 148, 0)]
    message = f"'text' \\[{n}, {n + 100}\\) and 'image' \\[{n + 88}, {n + 138}\\) overlap"
    with pytest.raises(UnifiedError, match=message):
        TokenLayout(segments)


def test_save_load_and_bad_files(tmp_path):
    lay = layout()
    lay.save(tmp_path / "layout.json")
    assert TokenLayout.load(tmp_path / "layout.json") == lay
    (tmp_path / "bad.json").write_text('{"format": "unified-token-layout", "format_version": 99}')
    with pytest.raises(UnifiedError, match="bad.json: token layout format_version 99"):
        TokenLayout.load(tmp_path / "bad.json")
    (tmp_path / "worse.json").write_text("[1, 2]")
    with pytest.raises(UnifiedError, match="worse.json"):
        TokenLayout.load(tmp_path / "worse.json")
