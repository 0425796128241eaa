"""FastCLIP against direct linear-space float64 implementations of docs/objectives.md A.3; numerics, checkpoints,
sharing.

The reference formulas below are written out independently of components/train/objectives/fastclip.py (no log
space, no masking tricks), so an error in the objective's algebra cannot cancel out.
"""

from __future__ import annotations

import io
import math
import os

import pytest
import torch
import torch.nn.functional as F
from distributed_harness import run_ranks
from torch import nn

from components.common.recipe import FastClipSettings
from components.train.distributed import World, barrier
from components.train.objectives import ObjectiveContext
from components.train.objectives.fastclip import FastClipObjective, gamma_at, table_memory
from components.train.objectives.sample_tables import SampleTables, last_positions

G, D, N = 12, 8, 40  # global batch, embedding width, dataset size
EPS = 1e-14  # FastClipSettings.eps default


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors are tiny: one thread is faster, and leaves the machine's cores to others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _objective(version: str, betas=(0.9, 0.95), **settings) -> FastClipObjective:
    context = ObjectiveContext(dataset_size=N, embed_dim=D, optimizer_betas=betas, optimizer_eps=1e-8)
    return FastClipObjective(context, FastClipSettings(version=version, **settings))


def _batch(seed: int, b: int = G) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, D, generator=gen, dtype=torch.float64), dim=-1)
    y = F.normalize(x + 0.8 * torch.randn(b, D, generator=gen, dtype=torch.float64), dim=-1)  # positives related
    return x.requires_grad_(), y.requires_grad_()


def _extra(objective: FastClipObjective) -> dict:
    """A detached copy of the objective's checkpointed state."""
    state = objective.state_dict()["_extra_state"]
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


# --- the spec, directly (float64, linear space) ------------------------------------------------------------------

def direct_ghat(x, y, tau_image, tau_text):
    """ghat1(i) = 1/(G-1) sum_{j != i} exp((a_ij - a_ii) / tau1_i); ghat2 with a_ji. tau: a scalar or one per anchor."""
    a = x @ y.T
    pos = a.diagonal()
    off = ~torch.eye(len(x), dtype=torch.bool)
    t1 = torch.as_tensor(tau_image, dtype=a.dtype).expand(len(x))[:, None]
    t2 = torch.as_tensor(tau_text, dtype=a.dtype).expand(len(x))[:, None]
    g1 = (torch.exp((a - pos[:, None]) / t1) * off).sum(1) / (len(x) - 1)
    g2 = (torch.exp((a.T - pos[:, None]) / t2) * off).sum(1) / (len(x) - 1)
    return g1, g2


def direct_u(u_old, g, gamma):
    """u_new = (1 - gamma) u_old + gamma g, or g where u_old is < 1e-35, inf or NaN."""
    reset = ~(u_old >= 1e-35) | torch.isinf(u_old)
    return torch.where(reset, g, (1 - gamma) * u_old + gamma * g)


def _last_positions(indices: torch.Tensor) -> dict[int, int]:
    return {int(i): p for p, i in enumerate(indices)}


# --- tests ---------------------------------------------------------------------------------------------------------

def test_gamma_schedule():
    cosine = FastClipSettings(gamma_min=0.2, gamma_decay_epochs=4)
    assert gamma_at(0, cosine) == 1.0
    assert gamma_at(1, cosine) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert gamma_at(2, cosine) == pytest.approx(0.6)
    assert gamma_at(4, cosine) == gamma_at(30, cosine) == 0.2
    constant = FastClipSettings(gamma_schedule="constant", gamma_min=0.3)
    assert gamma_at(0, constant) == 1.0
    assert gamma_at(1, constant) == gamma_at(17, constant) == 0.3
    objective = _objective("v1", gamma_min=0.2, gamma_decay_epochs=4)
    objective.on_epoch_start(2)
    x, y = _batch(0)
    assert objective(x, y, torch.tensor(10.0), None, torch.arange(G)).metrics["gamma"] == pytest.approx(0.6)


@pytest.mark.parametrize("variant", ["v0", "v1", "v2", "v2-paper", "v3"])
def test_u_update_and_encoder_gradient_match_the_spec(variant):
    """Epoch 1 step after an epoch 0 step: moving average with resets of unusable entries, a duplicated index, and
    the encoder gradient 1/2 (1/G) sum_i w_i [grad ghat1(i) / (u1_i + eps) + grad ghat2(i) / (u2_i + eps)] with the
    UPDATED u (w = 1; tau for v3; tau_i for v2-paper)."""
    version, paper = variant.split("-")[0], variant.endswith("paper")
    gamma, s = 0.3, torch.tensor(1 / 0.1, dtype=torch.float64)
    objective = _objective(version, gamma_schedule="constant", gamma_min=gamma, temperature_init=0.1, lr_tau=0.02,
                           tau_gradient="paper" if paper else "code")
    x0, y0 = _batch(0)
    objective(x0, y0, s, None, torch.arange(G))
    objective.on_epoch_start(1)
    planted = _extra(objective)
    planted["log_u_image"][:3] = torch.tensor([math.nan, math.inf, math.log(1e-40)])  # all three must be reset
    planted["log_u_text"][3] = math.nan
    objective.load_state_dict({"_extra_state": planted})

    indices = torch.tensor([0, 1, 2, 3, 4, 5, 20, 21, 6, 3, 22, 7])  # 3 twice; 20-22 never seen
    before = _extra(objective)
    x, y = _batch(1)
    out = objective(x, y, s, None, indices)
    out.loss.backward()
    after = _extra(objective)

    if version == "v2":
        tau1, tau2 = before["tau_image"][indices].double(), before["tau_text"][indices].double()
    else:
        tau1 = tau2 = 1 / s
    u_new = []
    for column, g in zip(("log_u_image", "log_u_text"), direct_ghat(x.detach(), y.detach(), tau1, tau2)):
        u = direct_u(before[column][indices].double().exp(), g, gamma)
        stored = {i: float(after[column][i].double().exp()) for i in _last_positions(indices)}
        expected = {i: float(u[p]) for i, p in _last_positions(indices).items()}
        assert stored == pytest.approx(expected, rel=1e-5)
        u_new.append(u)

    xd, yd = x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()
    g1, g2 = direct_ghat(xd, yd, tau1, tau2)
    w1, w2 = (tau1, tau2) if paper else (1 / s, 1 / s) if version == "v3" else (1.0, 1.0)
    surrogate = w1 * g1 / (u_new[0] + EPS) + w2 * g2 / (u_new[1] + EPS)
    gx, gy = torch.autograd.grad(0.5 * surrogate.mean(), (xd, yd))
    for got, want in ((x.grad, gx), (y.grad, gy)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))

    value = surrogate.mean()  # both sides together count every ratio twice, halved: the mean ratio
    if version == "v3":
        value = value + (8.0 + 0.5 * (u_new[0].log() + u_new[1].log()).mean()) / s
    assert out.loss.item() == pytest.approx(float(value.detach()), rel=1e-5)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_v3_temperature_gradient_by_finite_differences(mode):
    """d loss / d tau is tau dV/dtau ("code", the reference's factor 2) or tau/2 dV/dtau ("paper"), plus
    0.5 mean(log u1 + log u2) + rho, with V(tau) = mean_i [ghat1(i; tau) / (u1_i + eps) + ghat2(i; tau) / (u2_i + eps)]
    at the updated u; dV/dtau by central differences of the direct formula."""
    rho, gamma, tau = 6.5, 0.3, 0.05
    objective = _objective("v3", rho=rho, gamma_schedule="constant", gamma_min=gamma, tau_gradient=mode)
    x0, y0 = _batch(0)
    objective(x0, y0, torch.tensor(1 / tau, dtype=torch.float64), None, torch.arange(G))
    objective.on_epoch_start(1)
    before = _extra(objective)
    x, y = (t.detach() for t in _batch(1))
    s = torch.tensor(1 / tau, dtype=torch.float64, requires_grad=True)
    (ds,) = torch.autograd.grad(objective(x, y, s, None, torch.arange(G)).loss, s)
    tau_grad = float(-(s.detach() ** 2) * ds)  # s = 1/tau

    g1, g2 = direct_ghat(x, y, tau, tau)
    u1 = direct_u(before["log_u_image"][:G].double().exp(), g1, gamma)
    u2 = direct_u(before["log_u_text"][:G].double().exp(), g2, gamma)

    def v(t):
        h1, h2 = direct_ghat(x, y, t, t)
        return float((h1 / (u1 + EPS) + h2 / (u2 + EPS)).mean())

    h = 1e-6
    dv = (v(tau + h) - v(tau - h)) / (2 * h)
    factor = tau if mode == "code" else tau / 2
    expected = factor * dv + 0.5 * float((u1.log() + u2.log()).mean()) + rho
    assert tau_grad == pytest.approx(expected, rel=1e-4)


def test_v2_per_sample_temperature_gradient_and_adam_step():
    """grad_i = log(u_i + eps) + rho + tau_i d ghat_i/d tau_i / (u_i + eps), clipped to [-5, 5], read back from
    Adam's first moment; then tau_i <- clip(tau_i - lr m_hat / (sqrt(v_hat) + eps), 0.01, 1) with step epoch + 1."""
    beta1, beta2, lr, rho, gamma, tau0 = 0.5, 0.9, 0.02, 0.5, 0.4, 0.3
    objective = _objective("v2", betas=(beta1, beta2), temperature_init=tau0, lr_tau=lr, rho=rho,
                           gamma_schedule="constant", gamma_min=gamma)
    x0, y0 = _batch(0)
    objective(x0, y0, torch.tensor(1.0), None, torch.arange(G))
    first = _extra(objective)
    for column in ("tau_image", "tau_text"):  # epoch 0: beta1 = beta2 = 0, a step of about lr * sign(grad)
        torch.testing.assert_close((first[column][:G] - tau0).abs(), torch.full((G,), lr), rtol=1e-5, atol=1e-6)

    objective.on_epoch_start(1)
    x, y = (t.detach() for t in _batch(1))
    objective(x, y, torch.tensor(1.0), None, torch.arange(G))
    after = _extra(objective)
    tau1, tau2 = first["tau_image"][:G].double(), first["tau_text"][:G].double()
    h = 1e-6
    g = direct_ghat(x, y, tau1, tau2)
    g_plus, g_minus = direct_ghat(x, y, tau1 + h, tau2 + h), direct_ghat(x, y, tau1 - h, tau2 - h)
    for k, side in enumerate(("image", "text")):
        tau = (tau1, tau2)[k]
        u = direct_u(first[f"log_u_{side}"][:G].double().exp(), g[k], gamma)
        dg = (g_plus[k] - g_minus[k]) / (2 * h)
        grad = (torch.log(u + EPS) + rho + tau * dg / (u + EPS)).clamp(-5, 5)
        assert int((grad.abs() < 5).sum()) >= G // 2  # the comparison is not only about the clip
        m_old, v_old = first[f"m_{side}"][:G].double(), first[f"v_{side}"][:G].double()
        m_new, v_new = after[f"m_{side}"][:G].double(), after[f"v_{side}"][:G].double()
        torch.testing.assert_close((m_new - beta1 * m_old) / (1 - beta1), grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v_new, beta2 * v_old + (1 - beta2) * grad**2, rtol=1e-4, atol=1e-5)
        m_hat, v_hat = m_new / (1 - beta1**2), v_new / (1 - beta2**2)
        tau_new = (tau - lr * m_hat / (v_hat.sqrt() + 1e-8)).clamp(0.01, 1.0)
        torch.testing.assert_close(after[f"tau_{side}"][:G].double(), tau_new, rtol=1e-5, atol=1e-6)


def _adversarial(b: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Every positive maximally dissimilar, each negative identical to its anchor, a duplicated sample."""
    x, _ = _batch(3, b)
    x = x.detach().float()
    y = -x.clone()
    y[1:] = x[:-1]
    y[3] = y[4]
    return x, y


@pytest.mark.parametrize("version", ["v0", "v1", "v2", "v3"])
@pytest.mark.parametrize("autocast", [False, True])
def test_adversarial_numerics(version, autocast):
    """Scale 100, negatives beating positives, duplicated indices, stale u far from ghat, bf16 autocast: finite."""
    objective = _objective(version, temperature_init=0.01, lr_tau=0.01, gamma_schedule="constant", gamma_min=0.01)
    indices = torch.tensor([0, 1, 2, 3, 4, 5, 6, 3])
    benign = tuple(t.detach().float() for t in _batch(4, 8))
    dtype = torch.bfloat16 if autocast else torch.float32
    for epoch, features in ((0, benign), (1, _adversarial()), (2, benign)):  # u: moderate, then far too small/large
        objective.on_epoch_start(epoch)
        x, y = (t.to(dtype).requires_grad_() for t in features)
        s = torch.tensor(100.0, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = objective(x, y, s, None, indices).loss
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(t.grad).all() for t in (x, y))
        assert version in ("v1", "v2") or torch.isfinite(s.grad)
    state = _extra(objective)
    assert all(torch.isfinite(v[indices]).all() for k, v in state.items() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("version", ["v0", "v2", "v3"])
def test_state_round_trip_continues_identically(version):
    settings = dict(lr_tau=0.02, gamma_decay_epochs=2)
    original = _objective(version, **settings)
    s = torch.tensor(14.0)
    for epoch, seed, indices in ((0, 0, torch.arange(G)), (1, 1, torch.arange(6, 6 + G))):
        original.on_epoch_start(epoch)
        original(*_batch(seed), s, None, indices)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = _objective(version, **settings)
    restored.load_state_dict(torch.load(buffer, weights_only=True))

    x, y = (t.detach() for t in _batch(2))
    indices = torch.arange(3, 3 + G)
    a = original(x, y, s, None, indices)
    b = restored(x, y, s, None, indices)
    assert torch.equal(a.loss, b.loss) and a.metrics == b.metrics
    for key, value in _extra(original).items():
        other = _extra(restored)[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


class _Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(0.0))


def test_temperature_schemes():
    model = _Temperature()
    for version in ("v1", "v2"):  # frozen at ln(1/tau0), in no group
        objective = _objective(version, temperature_init=0.05)
        objective.init_model(model)
        assert model.logit_scale.item() == pytest.approx(math.log(20)) and not model.logit_scale.requires_grad
        assert objective.param_groups(model, lr=1e-3) == []

    v0 = _objective("v0")
    v0.init_model(model)
    assert model.logit_scale.requires_grad
    (group,) = v0.param_groups(model, lr=1e-3)
    assert group["lr"] == 1e-3 and group["weight_decay"] == 0 and not group["managed"]

    v3 = _objective("v3", lr_tau=1e-4)
    v3.init_model(model)
    (group,) = v3.param_groups(model, lr=1e-3)
    assert group["lr"] == 1e-4 and group["managed"]  # the step_thresh rule: tests/test_objectives.py
    optimizer = torch.optim.SGD([group], lr=1.0)
    with torch.no_grad():
        model.logit_scale.fill_(4.55)  # s = 94.6
    model.logit_scale.grad = torch.tensor(-1e4)  # lr 1e-4: a step to 4.55 + 1/3 (tau <= 0.03), beyond s = 100
    v3.optimizer_step(model, optimizer)
    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_table_memory_figures():
    assert table_memory("v3")["bytes_per_sample"] == table_memory("v1")["bytes_per_sample"] == 8
    assert table_memory("v2")["bytes_per_sample"] == 32
    assert table_memory("v3") == {"bytes_per_sample": 8, "node_shared": 3_200_000_000,
                                  "node_replicated": 25_600_000_000}  # 400M samples, 8 ranks per node


@pytest.mark.parametrize("seed", range(5))
def test_last_positions_match_a_plain_loop(seed):
    indices = torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(seed))
    last = {int(i): p for p, i in enumerate(indices)}
    assert last_positions(indices).tolist() == [last[int(i)] for i in indices]


def test_a_table_per_process_writes_the_last_duplicate():
    tables = SampleTables({"a": -1.0, "b": 0.5}, 10, World(), "unused")
    assert not tables.shared and tables.path is None
    tables.write(torch.tensor([7, 2, 7, 5, 7]), torch.arange(10.0).view(5, 2))
    assert tables.data[7].tolist() == [8.0, 9.0] and tables.data[2].tolist() == [2.0, 3.0]
    assert tables.data[5].tolist() == [6.0, 7.0] and tables.data[0].tolist() == [-1.0, 0.5]
    assert tables.read(torch.tensor([5, 7])).tolist() == [[6.0, 7.0], [8.0, 9.0]]


def _shared_table_probe() -> dict:
    world = World.current()
    tables = SampleTables({"a": -1.0, "b": 0.5}, 10, world, f"probe-{os.getppid()}")
    barrier(world)  # local rank 0 has unlinked the file by now
    result = {"file_left": tables.path.exists(), "path": str(tables.path), "initial": tables.data.clone()}
    barrier(world)
    if world.rank == 1:
        tables.data[3, 0] = 42.0
    barrier(world)
    result["seen"] = float(tables.data[3, 0])
    # write(): both ranks pass the same global batch; each writes a share, the last duplicate wins
    tables.write(torch.tensor([7, 2, 7, 5]), torch.arange(8.0).view(4, 2))
    barrier(world)
    result["after"] = tables.data.clone()
    barrier(world)
    tables.load({"a": torch.full((10,), 9.0), "b": torch.arange(10.0)})  # each rank copies half of the rows
    barrier(world)
    result["loaded"] = tables.data.clone()
    return result


def test_node_shared_table_between_two_processes():
    ranks = run_ranks(2, _shared_table_probe)
    expected = torch.tensor([-1.0, 0.5]).expand(10, 2).clone()
    expected[3, 0] = 42.0
    expected[[7, 2, 5]] = torch.tensor([[4.0, 5.0], [2.0, 3.0], [6.0, 7.0]])
    for rank in ranks:
        assert rank["path"].startswith("/dev/shm/") and rank["path"] == ranks[0]["path"]
        assert not rank["file_left"]
        torch.testing.assert_close(rank["initial"], torch.tensor([-1.0, 0.5]).expand(10, 2))
        assert rank["seen"] == 42.0  # rank 1's write, seen by rank 0
        torch.testing.assert_close(rank["after"], expected)
        torch.testing.assert_close(rank["loaded"], torch.stack([torch.full((10,), 9.0), torch.arange(10.0)], 1))
