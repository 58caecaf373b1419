"""`experts_per_token`: hand-computed toy, a slow pandas implementation on random routing, map/merge/finish over
batches equal to one pass, and a top-p run recorded through the store (variable ranks per token)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import moelens.analysis as A
from moelens.analysis.data import RoutingData
from moelens.analysis.experts_per_token import (
    experts_per_token,
    experts_per_token_finish,
    experts_per_token_map,
    experts_per_token_merge,
)
from moelens.errors import InputError


def toy() -> RoutingData:
    """Layer 3: token 0 uses 1 expert, token 1 three, token 2 two, token 3 one (a dropped slot is -1)."""
    experts = np.array([[[4, -1, -1], [0, 1, 2], [5, 6, -1], [7, -1, -1]]])
    return RoutingData.from_arrays(experts, n_experts=8, layer_ids=[3], labels=["math", "code", "math", None])


def test_toy_by_hand() -> None:
    layer = experts_per_token(toy())
    assert layer[["n_experts", "count"]].values.tolist() == [[1, 2], [2, 1], [3, 1]]
    assert layer["share"].tolist() == pytest.approx([0.5, 0.25, 0.25])
    assert layer["mean_experts"].tolist() == pytest.approx([7 / 4] * 3)
    assert layer["std_experts"].iloc[0] == pytest.approx(np.std([1, 3, 2, 1]))
    by_label = experts_per_token(toy(), by="label")
    math = by_label[by_label["label"] == "math"]
    assert math["n_experts"].tolist() == [1, 2] and set(math["mean_experts"]) == {1.5}
    assert by_label[by_label["label"].isna()]["n_experts"].tolist() == [1]
    by_pos = experts_per_token(toy(), by="position")
    assert by_pos.set_index("pos")["mean_experts"].to_dict() == {0: 1.0, 1: 3.0, 2: 2.0, 3: 1.0}
    with pytest.raises(InputError, match="by must be one of"):
        experts_per_token(toy(), by="galaxy")


def random_data(seed: int) -> RoutingData:
    rng = np.random.default_rng(seed)
    L, T, K = 3, 400, 4
    experts = np.argsort(rng.random((L, T, 16)), axis=-1)[..., :K]  # distinct experts per token
    n = rng.integers(1, K + 1, (L, T))
    experts[np.arange(K)[None, None, :] >= n[..., None]] = -1
    seq = np.repeat(np.arange(20), 20)
    return RoutingData.from_arrays(experts, n_experts=16, layer_ids=[0, 2, 5], seq_id=seq, pos=np.tile(np.arange(20), 20),
                                   labels=rng.choice(["a", "b", None], T).tolist())


def slow(data: RoutingData, by: str) -> pd.DataFrame:
    rows = []
    for li, layer in enumerate(data.layer_ids):
        for t in range(data.n_tokens):
            group = {"label": data.label_names[data.label[t]] if data.label[t] >= 0 else None, "position": data.pos[t]}
            rows.append({"layer": layer, "g": group.get(by, 0), "n": int((data.experts[li, t] >= 0).sum())})
    df = pd.DataFrame(rows)
    stats = df.groupby(["layer", "g"], dropna=False)["n"].agg(["mean", "size"]).reset_index()
    counts = df.groupby(["layer", "g", "n"], dropna=False).size().rename("count").reset_index()
    return counts.merge(stats, on=["layer", "g"])


@pytest.mark.parametrize("by", ["layer", "label", "position"])
def test_against_a_slow_implementation(by: str) -> None:
    data = random_data(1)
    fast = experts_per_token(data, by=by)
    ref = slow(data, by)
    key = {"label": "label", "position": "pos"}.get(by)
    fast_keys = fast.assign(g=fast[key] if key else 0)
    merged = fast_keys.merge(ref, left_on=["layer", "g", "n_experts"], right_on=["layer", "g", "n"], how="outer")
    assert len(merged) == len(ref) == len(fast)
    assert (merged["count_x"] == merged["count_y"]).all()
    assert np.allclose(merged["mean_experts"], merged["mean"]) and (merged["n_tokens"] == merged["size"]).all()


def test_map_merge_finish_over_batches_equals_one_pass() -> None:
    data = random_data(2)
    halves = [data.select(data.seq_id < 7), data.select(data.seq_id >= 7)]
    for by in ("layer", "label", "position"):
        state = experts_per_token_merge(*(experts_per_token_map(h, by=by) for h in halves))
        pd.testing.assert_frame_equal(experts_per_token_finish(state).reset_index(drop=True),
                                      experts_per_token(data, by=by).reset_index(drop=True), check_dtype=False)


def test_registered() -> None:
    spec = A.SCORES["experts_per_token"]
    assert spec.parse({"by": "label"}) == {"by": "label"}
    assert A.run_score(toy(), None, "experts_per_token")["count"].sum() == 4
