"""Model registry: shapes, the spec's parameter counts, exposed parts, taps and in-model normalisation."""

import pytest
import torch

from ensemble_core.models import build_model, model_names


@pytest.mark.parametrize("name, c, s", [("lenet5", 1, 28), ("lenet5_classic", 1, 28), ("resnet20", 3, 32),
                                        ("resnet18", 3, 32), ("dkd_mnist", 1, 28), ("dkd_cifar10", 3, 32),
                                        ("lenet5", 3, 32), ("resnet20", 1, 28)])
def test_every_model_gives_consistent_parts(name: str, c: int, s: int) -> None:
    torch.manual_seed(0)
    m = build_model(name, num_classes=10, in_channels=c, image_size=s).eval()
    x = torch.rand(2, c, s, s)
    parts = m.forward_parts(x)
    assert parts.logits.shape == (2, 10) and parts.features.shape == (2, m.feature_dim)
    assert torch.allclose(m(x), parts.logits) and torch.allclose(m.head(parts.features), parts.logits)
    assert len(m.conv_taps()) >= 2 and all(isinstance(t, torch.nn.Conv2d) for t in m.conv_taps())


def test_registry_lists_the_issue_architectures() -> None:
    assert {"lenet5", "resnet20", "resnet18", "dkd_mnist", "dkd_cifar10"} <= set(model_names())
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vgg99")


def test_parameter_counts_match_the_specs() -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_model("dkd_mnist")) == 312_202  # DKD spec §5.1 Table I
    assert count(build_model("dkd_cifar10", in_channels=3, image_size=32)) == 1_406_794
    # CLDL spec §5 LeNet: 20·25+20 + 50·20·25+50 + 800·500+500 + 500·64+64 + 64·10+10
    assert count(build_model("lenet5")) == 520 + 25_050 + 400_500 + 32_064 + 650
    assert count(build_model("resnet20", in_channels=3, image_size=32)) == 272_474  # the standard ResNet-20
    assert count(build_model("resnet18", in_channels=3, image_size=32)) == 11_173_962


def test_lenet5_rep_is_pre_activation_and_features_are_its_relu() -> None:
    m = build_model("lenet5")
    p = m.forward_parts(torch.rand(4, 1, 28, 28))
    assert p.rep.shape == (4, 64) and (p.rep < 0).any()
    assert torch.equal(p.features, torch.relu(p.rep))


def test_resnet20_cldl_variant_has_the_64_to_64_v_layer() -> None:
    m = build_model("resnet20", in_channels=3, image_size=32, rep_dim=64, activation="leaky_relu")
    p = m.forward_parts(torch.rand(2, 3, 32, 32))
    assert isinstance(m.rep, torch.nn.Linear) and (m.rep.in_features, m.rep.out_features) == (64, 64)
    assert torch.allclose(p.features, torch.nn.functional.leaky_relu(p.rep, 0.1))


def test_resnet20_taps_follow_forward_order_and_are_pre_bn() -> None:
    m = build_model("resnet20", in_channels=3, image_size=32)
    taps = m.conv_taps()
    # PARL spec §2.3: stem, then stage-1 block convs, all 16 channels at 32x32 for the first seven
    assert taps[0] is m.stem and all(t.out_channels == 16 for t in taps[:7])
    assert taps[1] is m.layers[0].conv1 and taps[2] is m.layers[0].conv2 and taps[6] is m.layers[2].conv2
    order: list[torch.nn.Module] = []
    hooks = [t.register_forward_hook(lambda mod, i, o: order.append(mod)) for t in taps]
    m(torch.rand(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert order == taps  # hooks fire in the listed order


def test_normalisation_happens_inside_the_model() -> None:
    m = build_model("lenet5", mean=(0.1307,), std=(0.3081,))
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(m.normalize(x), (x - 0.1307) / 0.3081)
    m2 = build_model("lenet5", mean=(0.0,), std=(1.0,))
    m2.load_state_dict(m.state_dict())  # mean/std are buffers saved with the weights
    assert torch.allclose(m2(x), m(x))


def test_place_stores_conv_weights_channels_last_on_a_cpu_and_keeps_the_outputs() -> None:
    """models.place: on a CPU every 4-d weight is channels-last (oneDNN's fast layout), 2-d ones are untouched,
    the module is the same object, and the logits equal the default layout's to float precision."""
    from ensemble_core.models import place

    torch.manual_seed(0)
    m = build_model("lenet5", 10)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        before = m(x).clone()
    placed = place(m, "cpu")
    assert placed is m
    convs = [p for p in m.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # the layout really changed (20 > 1 channels)
    assert all(p.is_contiguous() for p in m.parameters() if p.dim() == 2)
    with torch.no_grad():
        assert torch.allclose(m(x), before, atol=1e-5)

