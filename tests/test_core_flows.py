"""The row-wise autoregressive flow: autoregressive structure, exact log-determinant, identity at init, size."""

import torch

from bayeslora.flows import RowwiseAutoregressiveFlow


def _perturbed_flow() -> RowwiseAutoregressiveFlow:
    torch.manual_seed(0)
    flow = RowwiseAutoregressiveFlow(features=5, hidden=16, blocks=2).double()
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return flow


def test_flow_is_the_identity_at_initialisation():
    flow = RowwiseAutoregressiveFlow(features=9)
    v0 = torch.randn(9, 9)
    v, log_det = flow(v0)
    assert torch.equal(v, v0)
    assert log_det.item() == 0.0


def test_each_output_depends_only_on_earlier_features_of_its_own_row():
    flow = _perturbed_flow()
    v0 = torch.randn(3, 5, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda x: flow(x)[0], v0)  # (3, 5, 3, 5)
    for row in range(3):
        for other_row in range(3):
            block = jacobian[row, :, other_row, :]
            if row != other_row:
                assert torch.all(block == 0)
            else:
                assert torch.all(block.triu(diagonal=1) == 0), "feature i must not see features > i"


def test_log_determinant_matches_autograd_jacobian():
    flow = _perturbed_flow()
    v0 = torch.randn(3, 5, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda x: flow(x)[0], v0).reshape(15, 15)
    _, reference = torch.linalg.slogdet(jacobian)
    assert torch.allclose(flow(v0)[1], reference, atol=1e-10)


def test_reference_flow_size():
    count = lambda flow: sum(p.numel() for p in flow.parameters())  # noqa: E731
    assert count(RowwiseAutoregressiveFlow(9, hidden=16, blocks=2)) == 1554
