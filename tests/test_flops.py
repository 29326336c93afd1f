import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ebtrain.channel_flops import forward_flops
from ebtrain.earlybird import channel_scores, draw_mask
from ebtrain.flops import detector_ops, measure_cost
from ebtrain.models import build_model
from ebtrain.models.vgg import DEFAULT_CFGS
from ebtrain.prune import prune_channels


def conv_flops(side: int, c_in: int, c_out: int, k: int = 3) -> int:
    """Hand formula: 2 FLOPs per multiply-add, side^2 outputs per channel, c_in k^2 products each."""
    return 2 * side * side * c_out * c_in * k * k


def vgg_flops(cfg: list, num_classes: int, side: int = 32, c_in: int = 3) -> tuple[int, int]:
    """Forward FLOPs of a CIFAR VGG built from `cfg` by the hand formula; and those of its first conv."""
    total, first = 0, None
    for entry in cfg:
        if entry == "M":
            side = -(-side // 2)  # ceil-mode pooling
            continue
        flops = conv_flops(side, c_in, entry)
        first = flops if first is None else first
        total, c_in = total + flops, entry
    return total + 2 * c_in * num_classes, first


def test_single_conv_and_linear_layers_match_the_hand_formula():
    # pooling and flatten are not counted, so these nets cost exactly their conv / linear layers
    one_conv = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    cost = measure_cost(one_conv, (3, 10, 10), batch_size=4)
    forward = conv_flops(5, 3, 8)  # stride 2: 10x10 -> 5x5; the bias add is not counted
    assert cost.forward_flops_per_image == forward
    # the first layer's backward computes only the weight gradient (the input needs none): 1x forward
    assert cost.step_flops == 4 * 2 * forward
    assert cost.train_flops_per_image == 2 * forward
    assert [(l.name, l.in_channels, l.out_channels, l.params, l.forward_flops) for l in cost.layers] == \
        [("0", 3, 8, 8 * 3 * 9 + 8, forward)]

    two = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 5))
    cost = measure_cost(two, (3, 2, 2), batch_size=6)
    first, second = 2 * 12 * 7, 2 * 7 * 5
    assert cost.forward_flops_per_image == first + second
    # a later layer's backward computes the input and the weight gradient: 2x forward
    assert cost.step_flops == 6 * (2 * first + 3 * second)
    assert cost.params == 12 * 7 + 7 + 7 * 5 + 5


def test_counter_convention_is_two_flops_per_multiply_add():
    with FlopCounterMode(display=False) as counter:
        torch.zeros(2, 3) @ torch.zeros(3, 4)
    assert counter.get_total_flops() == 2 * 2 * 3 * 4


def test_vgg16_cifar10_forward_flops_equal_the_hand_formula():
    model = build_model("vgg16", num_classes=10)
    cost = measure_cost(model, (3, 32, 32), batch_size=256)
    forward, first = vgg_flops(DEFAULT_CFGS["vgg16"], 10)
    assert cost.forward_flops_per_image == forward == 626_403_328  # 313.2 M multiply-adds: the paper's 3.13e8
    assert len(cost.layers) == 14 and sum(l.forward_flops for l in cost.layers) == forward
    assert [l.out_channels for l in cost.layers] == [c for c in DEFAULT_CFGS["vgg16"] if c != "M"] + [10]
    # measured training = 3x forward except the first conv, which needs no input gradient
    assert cost.step_flops == 256 * (3 * forward - first)
    assert cost.params == sum(p.numel() for p in model.parameters())


def test_pruned_vgg_flops_equal_the_hand_formula_on_kept_channels():
    torch.manual_seed(0)
    model = build_model("vgg11", num_classes=4, width=0.25, image_size=8)
    for _, bn in model.prunable_bns():
        bn.weight.data.uniform_(0, 1)
    keep = draw_mask(channel_scores(model), 0.5).per_layer()
    pruned = prune_channels(model, keep)
    kept = iter(int(k.sum()) for k in keep)
    cfg = ["M" if c == "M" else next(kept) for c in DEFAULT_CFGS["vgg11"]]
    cost = measure_cost(pruned, (3, 8, 8), batch_size=16)
    assert cost.forward_flops_per_image == vgg_flops(cfg, 4, side=8)[0]
    assert cost.forward_flops_per_image < measure_cost(model, (3, 8, 8), 16).forward_flops_per_image / 2


@pytest.mark.parametrize("arch, kwargs", [("vgg11", {}), ("preresnet", {"depth": 11}), ("resnet20", {}),
                                          ("resnet18_imagenet", {}), ("resnet50_imagenet", {}),
                                          ("lenet300_100", {}), ("conv2", {})])
def test_every_family_dense_and_pruned_counts_like_real_tensors(arch, kwargs):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=4, width=0.25, image_size=8, **kwargs)
    models = [model]
    if model.prunable_bns():
        for _, bn in model.prunable_bns():
            bn.weight.data.uniform_(0, 1)
        models.append(prune_channels(model, draw_mask(channel_scores(model), 0.5).per_layer()))
    for net in models:
        cost = measure_cost(net, (3, 8, 8), batch_size=4)
        assert sum(l.forward_flops for l in cost.layers) == cost.forward_flops_per_image > 0
        # the meta-device count equals FlopCounterMode on a real CPU step
        with FlopCounterMode(display=False) as counter:
            nn.functional.cross_entropy(net.train()(torch.randn(4, 3, 8, 8)), torch.zeros(4, dtype=torch.long)).backward()
        assert cost.step_flops == counter.get_total_flops()


def test_imagenet_resnets_have_torchvisions_size_and_cost():
    # ResNet-18 and -50 at 224 px, 1000 classes: torchvision's parameters, 1.81 and 4.09 G multiply-adds
    for arch, params, flops in (("resnet18_imagenet", 11_689_512, 3_628_146_688),
                                ("resnet50_imagenet", 25_557_032, 8_178_368_512)):
        with torch.device("meta"):
            model = build_model(arch, num_classes=1000, image_size=224)
        assert sum(p.numel() for p in model.parameters()) == params
        assert forward_flops(model, (3, 224, 224))[0] == flops


def test_a_smaller_last_batch_is_counted_per_image():
    model = build_model("vgg11", num_classes=4, width=0.125, image_size=8)
    at_32 = measure_cost(model, (3, 8, 8), batch_size=32)
    # 100 images = three steps of 32 and one of 4; FLOPs are linear in the batch
    assert at_32.train_flops(100) == 3 * at_32.step_flops + measure_cost(model, (3, 8, 8), 4).step_flops
    assert at_32.train_flops_paper(100) == 300 * at_32.forward_flops_per_image


def test_detector_is_negligible_next_to_training():
    # VGG16 on CIFAR-10: 4,224 prunable channels, three ratios, one epoch of 50,000 images
    per_epoch = detector_ops(4224, 3, 1)
    assert 4224 * 3 * 12 < per_epoch < 1e6
    assert per_epoch / (50_000 * 3 * 626_403_328) < 1e-8
