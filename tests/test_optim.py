import torch

from rqat_sdk.modifiers.qat.optim import MasterWeightOptimizer


def test_bf16_weights_train_through_fp32_masters_exactly_like_fp32_adamw():
    torch.manual_seed(0)
    start = torch.randn(64, 32)
    model_param = torch.nn.Parameter(start.bfloat16())
    reference = torch.nn.Parameter(start.bfloat16().float())
    ours = MasterWeightOptimizer([{"params": [model_param], "lr": 1e-6}], torch.optim.AdamW, betas=(0.9, 0.95))
    theirs = torch.optim.AdamW([reference], lr=1e-6, betas=(0.9, 0.95))
    plain = torch.nn.Parameter(start.bfloat16())
    plain_bf16 = torch.optim.AdamW([plain], lr=1e-6, betas=(0.9, 0.95))
    for _ in range(20):
        grad = torch.randn(64, 32).bfloat16()
        model_param.grad, reference.grad, plain.grad = grad.clone(), grad.float(), grad.clone()
        ours.step()
        theirs.step()
        plain_bf16.step()
        ours.zero_grad()
    master = ours.pairs[0][1]
    assert torch.equal(master, reference.detach())
    assert torch.equal(model_param.detach(), reference.detach().bfloat16())
    assert not torch.equal(master, start.bfloat16().float()), "the masters moved"
    assert torch.equal(plain.detach(), start.bfloat16()), "plain bf16 AdamW loses updates this small"
    assert model_param.grad is None


def test_state_dict_round_trip_restores_masters_and_moments():
    params = [torch.nn.Parameter(torch.randn(8, 8).bfloat16()), torch.nn.Parameter(torch.randn(8))]
    optimizer = MasterWeightOptimizer([{"params": params, "lr": 1e-2}], torch.optim.AdamW)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = optimizer.state_dict()
    fresh = MasterWeightOptimizer([{"params": params, "lr": 1e-2}], torch.optim.AdamW)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.pairs[0][1], optimizer.pairs[0][1])
    assert fresh.pairs[1][1] is params[1], "fp32 parameters are their own masters"
    assert torch.equal(fresh.optimizer.state_dict()["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
