"""Block-KD (arXiv 2411.01547): block declarations, stepping-stone hybrids, the frozen teacher, the loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from loca_pipe.pipeline.blockkd import BlockKD, block_shapes, build_blockkd, declare_blocks
from loca_pipe.pipeline.calibration import loca_from_logits, mis_instruction_mask, swap
from loca_pipe.pipeline.errors import ConfigError, ModelError
from loca_pipe.pipeline.losses import METHODS, LossConfig, compute_loss
from loca_pipe.pipeline.models import build_model

# (arch, in_channels, image_size): every declared family, small inputs
FAMILIES = [("mlp_small", 1, 12), ("mlp", 1, 12), ("cnn_small", 1, 28), ("cnn", 1, 28), ("resnet8x4", 3, 16),
            ("resnet20", 3, 16), ("wrn_16_1", 3, 16), ("resnet18", 3, 32)]


def _x(c: int, s: int, b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,c,s", FAMILIES)
def test_declared_blocks_compose_to_the_models_forward(arch, c, s):
    torch.manual_seed(0)
    m = build_model(arch, 5, c, s).eval()
    b = declare_blocks(arch, m)
    x = _x(c, s)
    with torch.no_grad():
        assert torch.equal(b.forward(x), m(x))
    params = {id(p) for blk in b.blocks for p in blk.parameters()} | {id(p) for p in b.head.parameters()}
    assert params == {id(p) for p in m.parameters()}  # every parameter in exactly the blocks or the head


@pytest.mark.parametrize("arch,c,s", [("cnn", 1, 28), ("resnet8x4", 3, 16), ("wrn_16_1", 3, 16), ("mlp", 1, 12)])
def test_hybrids_of_the_teachers_own_blocks_with_identity_connectors_are_the_teacher(arch, c, s):
    torch.manual_seed(1)
    teacher = build_model(arch, 5, c, s)
    for mod in teacher.modules():  # non-trivial BN statistics
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    student = copy.deepcopy(teacher)
    bk = build_blockkd(student, arch, teacher, arch, c, s, identity=True).eval()
    x = _x(c, s)
    with torch.no_grad():
        want = teacher(x)
        zs, hybrids = bk(x)
    assert len(hybrids) == len(declare_blocks(arch, teacher).blocks)
    assert torch.equal(zs, want)
    for h in hybrids:
        assert torch.equal(h, want)


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    teacher, student = build_model("cnn", 4, 1, 12), build_model("cnn_small", 4, 1, 12)
    return teacher, student, build_blockkd(student, "cnn_small", teacher, "cnn", 1, 12)


def test_gradients_reach_student_and_connectors_and_never_the_teacher():
    teacher, student, bk = _pair()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ids = {id(p) for p in bk.parameters()}
    assert ids == {id(p) for p in student.parameters()} | {id(p) for p in bk.connectors.parameters()}
    assert not any(k.startswith("_teacher") for k in bk.state_dict())
    opt = torch.optim.SGD(bk.parameters(), lr=0.5, momentum=0.9)
    bk.train()
    assert not teacher.training
    x, y = _x(1, 12, 8), torch.arange(8) % 4
    zt = torch.randn(8, 4)
    for _ in range(2):
        zs, hyb = bk(x)
        loss = compute_loss("blockkd", zs, y, teacher_logits=zt, hybrids=hyb, cfg=LossConfig(cross=1.0))
        opt.zero_grad()
        loss.backward()
        for name, p in list(student.named_parameters()) + list(bk.connectors.named_parameters()):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        opt.step()
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats too (eval mode)
    # the first block's gradient comes through the hybrids as well: without them it differs
    zs, hyb = bk(x)
    g_all = torch.autograd.grad(compute_loss("blockkd", zs, y, teacher_logits=zt, hybrids=hyb), student[0].weight)[0]
    zs, _ = bk(x)
    g_kd = torch.autograd.grad(compute_loss("kd", zs, y, teacher_logits=zt), student[0].weight)[0]
    assert not torch.allclose(g_all, g_kd)


def _kl(t_probs: torch.Tensor, z: torch.Tensor, tau: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(z / tau, 1), t_probs, reduction="batchmean") * tau * tau


@pytest.mark.parametrize("method", ["blockkd", "blockkd_loca", "blockkd_kd_star", "blockkd_swap"])
@pytest.mark.parametrize("distance", ["kl", "mse"])
def test_blockkd_loss_matches_an_explicit_reference(method, distance):
    g = torch.Generator().manual_seed(3)
    B, C, n, tau = 16, 5, 3, 2.0
    zs = torch.randn(B, C, generator=g, dtype=torch.float64)
    hyb = [torch.randn(B, C, generator=g, dtype=torch.float64) for _ in range(n)]
    zt = torch.randn(B, C, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, C, (B,), generator=g)
    cfg = LossConfig(tau=tau, alpha=0.9, beta=0.7, gamma=0.3, cross=0.4, cross_distance=distance)
    p = torch.softmax(zt / tau, 1)
    keep = torch.ones(B, dtype=torch.bool)
    if method == "blockkd_loca":
        p = loca_from_logits(zt, y, 0.9, tau).probs
    elif method == "blockkd_swap":
        p = torch.softmax(swap(zt, y)[0] / tau, 1)
    elif method == "blockkd_kd_star":
        keep = ~mis_instruction_mask(zt, y)
    mean = sum(hyb) / n
    total = 0.0
    for i, z in enumerate([zs, *hyb]):
        w = 1.0 if i == 0 else 1.0 / 2 ** (n - i)  # hybrid i (1-based) weighs 1/2^(n-i)
        task = F.cross_entropy(z, y)
        rows = (p * (p.log() - F.log_softmax(z / tau, 1))).sum(1) * tau * tau
        distill = (rows * keep).sum() / B
        if distance == "kl":
            cross = _kl(torch.softmax(mean / tau, 1), z, tau)
        else:
            cross = ((z - mean) ** 2).mean()
        total = total + w * (0.3 * task + 0.7 * distill + 0.4 * cross)
    got = compute_loss(method, zs, y, teacher_logits=zt, hybrids=hyb, cfg=cfg)
    assert torch.allclose(got, total, rtol=1e-10, atol=1e-12)


def test_refusals():
    torch.manual_seed(0)
    with pytest.raises(ModelError, match="declares no blocks"):
        declare_blocks("mobilenet_v3_small", build_model("mobilenet_v3_small", 4, 3, 32))
    t, s = build_model("mlp", 4, 1, 12), build_model("mlp_small", 4, 1, 12)
    with pytest.raises(ConfigError, match="same number of blocks.*declares 1.*declares 2"):
        build_blockkd(s, "mlp_small", t, "mlp", 1, 12)
    t, s = build_model("resnet8x4", 4, 3, 16), build_model("cnn_small", 4, 3, 16)
    with pytest.raises(ConfigError, match="same number of blocks"):
        build_blockkd(s, "cnn_small", t, "resnet8x4", 3, 16)
    zs = torch.randn(4, 3)
    with pytest.raises(ConfigError, match="needs the stepping-stone hybrids"):
        compute_loss("blockkd", zs, torch.zeros(4, dtype=torch.long), teacher_logits=zs)
    with pytest.raises(ConfigError, match="takes no hybrids"):
        compute_loss("kd", zs, torch.zeros(4, dtype=torch.long), teacher_logits=zs, hybrids=[zs])
    with pytest.raises(ConfigError, match="cross_distance must be one of"):
        LossConfig(cross_distance="l1")
    assert METHODS["blockkd_loca"].loca and METHODS["blockkd"].base == "kd"


def test_block_shapes_and_connectors():
    _, _, bk = _pair()
    assert isinstance(bk, BlockKD) and bk.n == 2
    s = declare_blocks("cnn_small", build_model("cnn_small", 4, 1, 12))
    assert block_shapes(s, 1, 12) == [(16, 6, 6), (32, 3, 3)]
    conv = bk.connectors[0][0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (16, 32, (1, 1))
