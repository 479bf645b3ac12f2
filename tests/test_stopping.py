"""common/stopping.py: a caller's stop_when ends every diffusion sampler between two network calls."""
import pytest
import torch

from semanticist_fast.common.stopping import Stopped, check_stop, stop_when
from semanticist_fast.diffusion.flow import RectifiedFlow
from semanticist_fast.diffusion.gaussian import DDPMProcess
from semanticist_fast.diffusion.sampling import HeadSampler


class Network:
    """A stand-in network that counts its calls (zero output: every sampler then stays finite)."""

    def __init__(self, channels: int = 4):
        self.calls, self.channels = 0, channels

    def __call__(self, x, t):
        self.calls += 1
        return torch.zeros(x.shape[0], self.channels, *x.shape[2:])


def after(n: int, network: Network):
    return lambda: f"stopped after {network.calls} calls" if network.calls >= n else None


SAMPLERS = {
    "flow euler100": lambda net, noise: RectifiedFlow().sampler("euler100")(net, noise),
    "flow heun100": lambda net, noise: RectifiedFlow().sampler("heun100")(net, noise),
    "ddpm ancestral 100": lambda net, noise: DDPMProcess(learn_sigma=False).sampler("100")(net, noise),
    "ddpm ddim100": lambda net, noise: DDPMProcess(learn_sigma=False).sampler("ddim100")(net, noise),
    "ddpm dpm100": lambda net, noise: DDPMProcess(learn_sigma=False).sampler("dpm100")(net, noise),
    "head flow sde": lambda net, noise: HeadSampler("flow", 100).sample(
        lambda x, t: net(x[..., None, None], t)[..., 0, 0], 2, 4, "cpu"),
    "head ddpm ode": lambda net, noise: HeadSampler("ddpm", 100).sample(
        lambda x, t: net(x[..., None, None], t)[..., 0, 0].repeat(1, 2), 2, 4, "cpu", sampler="ode"),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_stops_between_network_calls(name):
    noise = torch.randn(2, 4, 2, 2)
    run = SAMPLERS[name]
    free = Network()
    run(free, noise)  # outside any scope: every step runs
    assert free.calls == 100
    net = Network()
    with pytest.raises(Stopped, match="stopped after 7 calls"), stop_when(after(7, net)):
        run(net, noise)
    assert net.calls == 7  # the eighth call never ran


def test_scopes_nest_and_end():
    with stop_when(lambda: "outer"):
        with stop_when(lambda: None):
            check_stop()  # the innermost scope decides
        with pytest.raises(Stopped, match="outer"):
            check_stop()
    check_stop()  # no scope left: nothing stops
