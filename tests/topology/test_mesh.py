"""hpresil.mesh: layouts against hand-computed groups (p5, GB200 NVL72, NVL36), the
placement rules, Megatron-Core's order-string groups, errors, and 16,384 ranks."""

from __future__ import annotations

import pytest

from hpresil.errors import LayoutError
from hpresil.mesh import MeshConfig, compute_layout
from hpresil.topology import NodeTopology, TopologyMap, simulated


def megatron_reference(world_size: int, parallel_size: list[int], mask: list[bool]) -> list[list[int]]:
    """Megatron-Core's ``generate_masked_orthogonal_rank_groups``, transcribed as the oracle."""

    def prefix_product(a: list[int]) -> list[int]:
        r = [1]
        for v in a:
            r.append(r[-1] * v)
        return r

    def decompose(index: int, shape: list[int]) -> list[int]:
        stride = prefix_product(shape)
        return [(index // d) % s for s, d in zip(shape, stride)]

    masked_shape = [s for s, m in zip(parallel_size, mask) if m]
    unmasked_shape = [s for s, m in zip(parallel_size, mask) if not m]
    stride = prefix_product(parallel_size)
    masked_stride = [d for d, m in zip(stride, mask) if m]
    unmasked_stride = [d for d, m in zip(stride, mask) if not m]
    group_size = prefix_product(masked_shape)[-1]
    groups = []
    for gi in range(world_size // group_size):
        g_idx = decompose(gi, unmasked_shape)
        groups.append([sum(x * y for x, y in zip(decompose(r, masked_shape), masked_stride))
                       + sum(x * y for x, y in zip(g_idx, unmasked_stride)) for r in range(group_size)])
    return groups


def _groups(layout, dim):
    return layout.groups(dim).tolist()


# ---- hand-computed layouts ------------------------------------------------------------


def test_p5_two_nodes_tp2_pp2_ep4():
    lay = compute_layout(MeshConfig(tp=2, pp=2, ep=4), simulated("p5x2"))
    assert (lay.dp, lay.edp) == (4, 2)
    assert _groups(lay, "tp") == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert _groups(lay, "dp") == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert _groups(lay, "pp") == [[r, r + 8] for r in range(8)]
    assert _groups(lay, "ep") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert _groups(lay, "edp") == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert lay.crossings("ep") == (4, 0, 0) and lay.crossings("pp") == (8, 8, 8)
    assert lay.coords(13) == {"pp": 1, "dp": 2, "cp": 0, "tp": 1, "edp": 1, "ep": 1, "etp": 0}


def test_gb200_nvl72_two_racks_tp4_ep8():
    lay = compute_layout(MeshConfig(tp=4, ep=8), simulated("nvl72x2"))
    assert (lay.dp, lay.edp) == (36, 18)
    tp = _groups(lay, "tp")
    assert len(tp) == 36 and tp[0] == [0, 1, 2, 3] and tp[35] == [140, 141, 142, 143]
    ep = _groups(lay, "ep")
    assert ep[8] == list(range(64, 72)) and ep[9] == list(range(72, 80))  # the rack boundary at 72
    assert _groups(lay, "dp")[0] == list(range(0, 144, 4))
    assert lay.crossings("tp")[1:] == (0, 0) and lay.crossings("ep")[2] == 0
    assert lay.crossings("dp") == (4, 4, 4)


def test_nvl36_four_racks_tp2_cp2_ep3_etp2_pp2():
    lay = compute_layout(MeshConfig(tp=2, cp=2, ep=3, etp=2, pp=2), simulated("nvl36x4"))
    assert (lay.dp, lay.edp) == (18, 12)
    assert _groups(lay, "cp")[:3] == [[0, 2], [1, 3], [4, 6]]
    assert _groups(lay, "etp")[:2] == [[0, 1], [2, 3]]
    ep = _groups(lay, "ep")
    assert ep[:2] == [[0, 2, 4], [1, 3, 5]] and [36, 38, 40] in ep
    assert _groups(lay, "dp")[0] == list(range(0, 72, 4))
    assert _groups(lay, "pp")[0] == [0, 72]
    for dim in ("tp", "cp", "etp"):
        assert lay.crossings(dim)[1] == 0, dim  # TP, CP and ETP inside a node (4 GPUs)
    assert lay.crossings("ep")[2] == 0


@pytest.mark.parametrize("spec", ["p5x4", "nvl72x2", "nvl36x4"])
def test_placement_rules_hold_for_every_valid_combination(spec):
    topo = simulated(spec)
    checked = 0
    for tp in (1, 2, 4, 8):
        for ep in (1, 2, 3, 4, 6, 8, 9, 12, 16, 18, 36, 72):
            for etp in (1, 2):
                try:
                    lay = compute_layout(MeshConfig(tp=tp, ep=ep, etp=etp), topo)
                except LayoutError:
                    continue
                checked += 1
                assert lay.crossings("tp")[1] == 0 and lay.crossings("etp")[1] == 0
                assert lay.crossings("ep")[2] == 0, (tp, ep, etp)
                assert sorted(lay.dense.ravel().tolist()) == list(range(topo.world_size))
    assert checked >= 8


# ---- Megatron-Core order strings -------------------------------------------------------


@pytest.mark.parametrize("token", ["tp", "cp", "dp", "pp", "tp-cp", "dp-cp", "tp-pp", "tp-cp-dp", "ep", "tp-dp-pp"])
def test_megatron_dense_groups_match_the_reference(token):
    lay = compute_layout(MeshConfig(tp=2, cp=2, pp=3, ep=4), TopologyMap.uniform(96, 8, 32))
    sizes = [2, 2, 1, lay.dp, 3]  # tp, cp, ep, dp, pp
    mask = [name in token.split("-") for name in ("tp", "cp", "ep", "dp", "pp")]
    assert lay.megatron_groups(token) == megatron_reference(96, sizes, mask)


@pytest.mark.parametrize("token", ["tp", "ep", "dp", "tp-ep", "pp", "ep-dp"])
def test_megatron_expert_groups_match_the_reference(token):
    lay = compute_layout(MeshConfig(tp=2, cp=2, pp=3, ep=4, etp=2), TopologyMap.uniform(96, 8, 32))
    sizes = [2, 1, 4, lay.edp, 3]  # tp=etp, cp=1, ep, dp=edp, pp
    mask = [name in token.split("-") for name in ("tp", "cp", "ep", "dp", "pp")]
    assert lay.megatron_groups(token, expert=True) == megatron_reference(96, sizes, mask)
    with pytest.raises(LayoutError):
        lay.megatron_groups("tp-tp")


# ---- errors ------------------------------------------------------------------------------


def test_ep16_on_nvl72_names_the_formula():
    with pytest.raises(LayoutError, match=r"ep\*etp=16 does not divide the 72 ranks of an NVL72 domain") as err:
        compute_layout(MeshConfig(tp=4, ep=16), simulated("nvl72x2"))
    assert "72 % 16 = 8" in str(err.value) and "ep that fit with etp=1: 1, 2, 3, 4, 6, 8, 9" in str(err.value)
    # Accepted when asked, and the explanation says which groups cross and why.
    lay = compute_layout(MeshConfig(tp=4, ep=16, allow_cross_domain=True), simulated("nvl72x2"))
    assert lay.groups("ep")[4].tolist() == list(range(64, 80))
    assert lay.crossings("ep") == (9, 9, 1)
    assert "1 of 9 cross domains" in str(lay)


@pytest.mark.parametrize("config, topo, pattern", [
    (MeshConfig(tp=8), "nvl72x2", r"tp=8 does not divide the 4 GPUs of a node"),
    (MeshConfig(etp=8, ep=2), "nvl72x2", r"etp=8 does not divide the 4 GPUs of a node"),
    (MeshConfig(ep=16), "p5x4", r"ep\*etp=16 exceeds the 8 ranks of a node"),
    (MeshConfig(tp=4, pp=5), "nvl72x2", r"tp\*cp\*pp=20 does not divide world_size=144"),
    (MeshConfig(tp=4, dp=4), "nvl72x2", r"tp\*cp\*dp\*pp=4\*1\*4\*1=16 != world_size=144.*dp = .* = 36"),
    (MeshConfig(tp=4, pp=4, ep=8), "nvl72x2", r"ep\*etp=8 does not divide the 36 ranks of a pipeline stage"),
])
def test_invalid_degrees_raise_the_documented_errors(config, topo, pattern):
    with pytest.raises(LayoutError, match=pattern):
        compute_layout(config, simulated(topo))


def test_config_rejects_nonsense():
    with pytest.raises(LayoutError, match="tp=0"):
        MeshConfig(tp=0)
    with pytest.raises(LayoutError, match="placement"):
        MeshConfig(placement="random")  # type: ignore[arg-type]
    assert compute_layout(MeshConfig(tp=8, allow_cross_node=True), simulated("nvl72x2")).crossings("tp")[1] == 18


# ---- scale, missing trays, non-contiguous ranks ------------------------------------------


def test_16384_ranks_with_missing_trays():
    topo = simulated("nvl72x228,missing=8")  # 220 full racks, 8 with a tray missing
    assert topo.world_size == 16384
    lay = compute_layout(MeshConfig(tp=4, ep=8, pp=2), topo)
    assert sorted(lay.order.tolist()) == list(range(16384))
    assert lay.crossings("tp")[1] == 0
    n, _, crossing = lay.crossings("ep")
    # Only the short racks (placed last) misalign: 8 x 68 ranks leave 8 x 4 ranks = 4 groups.
    assert (n, crossing) == (2048, 4)
    text = str(lay)
    assert "4 of 2048 cross domains" in text and "nvl72-rack227 (68)" not in text.split("\n")[0]
    assert "missing or spare trays" in text
    assert len(lay.megatron_groups("ep", expert=True)) == 2048


def test_packed_placement_repairs_hostname_ordered_ranks():
    # torchrun-style order: nodes of 4 racks interleaved by hostname (rack = i % 4).
    nodes = [NodeTopology(host=f"n{i}", domain=f"rack{i % 4}") for i in range(72)]
    topo = TopologyMap.from_nodes(nodes, [4] * 72)
    by_rank = compute_layout(MeshConfig(tp=4, ep=8), topo)
    assert by_rank.crossings("ep")[2] == 36  # every EP group straddles two racks
    assert "not contiguous per domain" in str(by_rank)
    packed = compute_layout(MeshConfig(tp=4, ep=8, placement="packed"), topo)
    assert packed.crossings("ep")[2] == 0 and packed.crossings("tp")[1] == 0
    assert packed.megatron_groups("ep", expert=True)[0] == [0, 1, 2, 3, 16, 17, 18, 19]
    with pytest.raises(LayoutError, match="not ascending along mesh dim"):
        packed.dense_mesh("cpu")


# ---- torch DeviceMesh ------------------------------------------------------------------------


def test_device_meshes_have_the_layout_groups():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    lay = compute_layout(MeshConfig(tp=2, ep=4), simulated("p5x2"))
    dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=16)
    try:
        dense, expert = lay.dense_mesh("cpu"), lay.expert_mesh("cpu")
        assert dense.mesh_dim_names == ("pp", "dp", "cp", "tp") and tuple(dense.shape) == (1, 8, 1, 2)
        assert expert.mesh_dim_names == ("pp", "edp", "ep", "etp") and tuple(expert.shape) == (1, 4, 4, 1)
        assert dist.get_process_group_ranks(expert.get_group("ep")) == [4, 5, 6, 7]
        assert dist.get_process_group_ranks(dense.get_group("tp")) == [4, 5]
        assert dist.get_process_group_ranks(dense.get_group("dp")) == [1, 3, 5, 7, 9, 11, 13, 15]
        coord = lay.coords(5)
        assert tuple(dense.get_coordinate()) == tuple(coord[d] for d in ("pp", "dp", "cp", "tp"))
    finally:
        dist.destroy_process_group()
