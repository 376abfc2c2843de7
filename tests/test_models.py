import pytest
import torch

from securemark import models
from securemark.errors import InputError


@pytest.mark.parametrize("name", models.MODELS)
def test_build_is_reproducible_and_leaves_the_global_random_state_alone(name, monkeypatch):
    """The same seed gives the same weights, another seed others; the caller's torch RNG goes on as if no
    model had been built (a build used to reseed it to 0: every caller then drew the same "random" numbers)."""
    shape = (3, 32, 32) if name == "cifar-cnn" else (1, 28, 28)

    def reseeded(*_):
        raise AssertionError("models.build reseeded a GPU generator")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded)  # what torch.manual_seed calls on every device
    monkeypatch.setattr(torch.mps, "manual_seed", reseeded)
    torch.random.default_generator.manual_seed(1234)
    expected = torch.rand(5)
    torch.random.default_generator.manual_seed(1234)
    a = models.build(name, shape, 10, seed=3)
    assert torch.equal(torch.rand(5), expected)
    b, c = models.build(name, shape, 10, seed=3), models.build(name, shape, 10, seed=4)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_weights_that_name_no_module_are_refused_as_input():
    model = models.build("mlp", (1, 8, 8), 10, width=4)
    with pytest.raises(InputError, match="names no module"):
        models.load_weights(model, {"net.9.weight": torch.zeros(3, 3)})
