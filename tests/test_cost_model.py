"""benchmarks/cost_model.py against counts done by hand on a tiny model at 2 ranks.

Tiny model: 2 layers, d = 4, vocab 10, GELU MLP of 8, no biases, no position table. Its
parameters: embedding 10×4 and five norm gains of 4 (AdamW); per layer q, k, v, o 4×4 and fc1
8×4 (m >= n: sharded Gram under FSDP) and fc2 4×8 (m < n: owner-held). Every matrix has k = 4, so
one PolarExpress root (10 steps, four k×k GEMMs of 2·k³ each) costs 80·64 = 5120 FLOPs.
FSDPASGO all-reduces an int32 has-gradient flag for each of the 18 parameters every step (72
bytes) and a momentum-nonzero flag for each sharded-Gram matrix every refresh.
"""

from __future__ import annotations

import pytest

import cost_model  # benchmarks/ (pyproject.toml: pytest's pythonpath)

TINY = cost_model.Shape("tiny", layers=2, d_model=4, vocab=10, mlp_hidden=8, mlp="gelu")
ROOT = 80 * 4 ** 3
WORLD = 2
FLAGS = 18 * 4


def tiny_cost(method: str, tau: int = 1) -> cost_model.Cost:
    return cost_model.method_cost(method, cost_model.model_params(TINY), WORLD, tau)


def test_fsdp_replicated_roots_counts():
    cost = tiny_cost("fsdp_replicated_roots")
    # Every rank: the 10 sharded-Gram roots, plus the one fc2 it owns (two equal fc2s, two ranks).
    assert max(cost.root) == 10 * ROOT + ROOT
    # All-reduces (a ring sends 2·(1/2) of the buffer at 2 ranks): the flags, and for each of the
    # 10 matrices its Gram (16 floats), squared norm (1) and momentum flag: 4·17 + 4 bytes;
    # each fc2: weight + gradient rows to the owner, rows back: 3 · (2 rows · 8) · 4 bytes / 2 ranks.
    assert cost.comm == pytest.approx(FLAGS + 10 * (68 + 4) + 2 * 3 * 16 * 4 / 2)
    # One rank, float32: AdamW (5 embedding rows, 2 of each norm: 2·(20 + 5·2) floats);
    # q, k, v, o: 2 momentum rows + V + R = 8 + 32 floats; fc1: 4 rows (16) + 32; its fc2: 32 + 32.
    per_rank = 2 * (20 + 10) + 2 * (4 * (8 + 32) + (16 + 32)) + (32 + 32)
    assert cost.state == [4 * per_rank] * WORLD


def test_split_roots_share_the_roots_once_per_refresh():
    for tau in (1, 10):
        cost = tiny_cost("fsdp_split_roots", tau)
        assert cost.root == [6 * ROOT] * WORLD            # 1 fc2 + 5 of the 10 Gram roots each
        roots_shared = 10 * (16 + 4) * 4                   # 10 roots of 16 floats + 4 fallback flags
        assert cost.comm == pytest.approx(FLAGS + 10 * (68 + 4 / tau) + 2 * 96 + roots_shared / 2 / tau)
        assert cost.payload == pytest.approx(FLAGS + 10 * (68 + 4 / tau) + 2 * 96 + roots_shared / 2 / tau)


def test_ddp_owner_counts():
    # parameter_cost (τ = 1): fc1, fc2 4·32·4 + 64 = 576; embedding 12·40 = 480; q-type
    # 4·16·4 + 64 = 320; norms 12·4 = 48. Greedy: fc1, fc2, fc1, fc2 → 0, 1, 0, 1; the embedding
    # → 0 (1632 vs 1152); the eight 320s → 1, 1, 0, 1, 0, 1, 0, 1; the norms → 0, 0, 0, 0, 1.
    cost = tiny_cost("ddp_owner")
    rank0_numel = 2 * 32 + 40 + 3 * 16 + 4 * 4
    # The all-gather pads to the larger share; each rank receives the other rank's chunk.
    assert cost.payload == cost.comm == pytest.approx(rank0_numel * 4)
    rank0_state = 2 * (32 + 32) + 2 * 40 + 3 * (16 + 32) + 4 * 2 * 4
    rank1_state = 2 * (32 + 32) + 5 * (16 + 32) + 2 * 4
    assert cost.state == [4 * rank0_state, 4 * rank1_state]
    assert cost.root == [5 * ROOT, 7 * ROOT]


def test_adamw_and_muon_counts():
    # Rows per rank: embedding 5, norms 2 each, q-type 2 of 4 columns, fc1 4 of 4, fc2 2 of 8.
    rows_numel = 5 * 4 + 5 * 2 + 8 * (2 * 4) + 2 * (4 * 4) + 2 * (2 * 8)
    assert tiny_cost("adamw").state == [8 * rows_numel] * WORLD
    muon = tiny_cost("muon")
    matrix_rows = 8 * (2 * 4) + 2 * (4 * 4) + 2 * (2 * 8)
    assert muon.state == [8 * (5 * 4 + 5 * 2) + 4 * matrix_rows] * WORLD
    # Newton–Schulz, 5 steps of 4·k²·K + 2·k³: q-type 5·(256 + 128), fc1/fc2 5·(512 + 128).
    total_ns = 8 * 5 * 384 + 4 * 5 * 640
    assert sum(muon.root) == total_ns
    # Momentum rows to the owner and the update rows back: 2 · (half of m·n) · 4 bytes / 2 ranks.
    assert muon.comm == pytest.approx(sum(2 * (mn // 2) * 4 / 2 for mn in [16] * 8 + [32] * 4))


@pytest.mark.parametrize("world", [1, 2, 3, 16])
def test_owner_split_is_the_adapters(world):
    """The model's restated greedy split gives the owners and loads of the adapter's."""
    from asgo_core.adapters.torch_distributed import assign_owners

    costs = [5, 3, 3, 8, 1, 1, 2, 9, 0, 4, 7, 7]
    for initial in ([0] * world, [(3 * rank) % 5 for rank in range(world)]):
        model_loads, adapter_loads = list(initial), list(initial)
        assert (cost_model.assign_owners(costs, world, model_loads)
                == assign_owners(costs, world, adapter_loads))
        assert model_loads == adapter_loads
