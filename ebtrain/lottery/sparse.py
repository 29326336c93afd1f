"""A linear layer of K networks held block-sparse: only the kept weights are stored, multiplied and
trained.

Late lottery rounds keep a few percent of the weights, and dense products would spend nearly all their
arithmetic on zeros. On the CPU, a batched model whose input layer is linear and keeps less than
`SPARSE_BELOW` of its weights holds only the kept weights of that layer (`BlockSparse`): its forward
pass is one sparse-dense product with the K networks' weights as a block-diagonal CSR matrix, its
weight gradient is computed at the kept positions only (a sampled product), and the optimizer steps
only those. The arithmetic is the dense path's with the zeros left out, so results agree with it to
float tolerance.
"""
from __future__ import annotations

import warnings

import torch

# Density below which a batched input layer trains block-sparse on the CPU: where the sparse forward
# product and sampled weight gradient (torch 2.14, MKL) beat the dense batched products for
# LeNet-300-100's 784 -> 300 layer, 9 networks, batch 60 (scripts/bench_lottery.py --density).
SPARSE_BELOW = 0.25


class BlockSparse:
    """The kept positions of K stacked weights [K, out, in] as one block-diagonal CSR pattern of shape
    [K * out, K * in]: network k's weight is the block at rows k * out.., columns k * in... Its values
    (the kept weights, in CSR order) are what trains."""

    def __init__(self, mask: torch.Tensor):
        k, o, i = mask.nonzero(as_tuple=True)  # row-major: rows k * out + o ascend, columns within a row too
        K, out, in_ = self.shape = tuple(mask.shape)
        self.crow = torch.zeros(K * out + 1, dtype=torch.long, device=mask.device)
        self.crow[1:] = torch.bincount(k * out + o, minlength=K * out).cumsum(0)
        self.col = k * in_ + i
        self.flat = mask.reshape(-1).nonzero().squeeze(1)  # where each value sits in the stacked weight

    def values(self, stacked: torch.Tensor) -> torch.Tensor:
        """The kept entries of a stacked weight [K, out, in], in CSR order."""
        return stacked.reshape(-1)[self.flat]

    def stacked(self, values: torch.Tensor) -> torch.Tensor:
        """The stacked weight [K, out, in] with `values` at the kept positions and zeros elsewhere."""
        return values.new_zeros(self.shape).view(-1).index_copy_(0, self.flat, values).view(self.shape)

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """The block-diagonal CSR matrix [K * out, K * in] holding `values`."""
        K, out, in_ = self.shape
        with warnings.catch_warnings():
            # torch warns once per process that CSR support is in beta; the calls used here are stable
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
            # the pattern is valid by construction: skip the per-call index checks
            return torch.sparse_csr_tensor(self.crow, self.col, values, (K * out, K * in_), check_invariants=False)


def block_sparse_linear(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, pattern: BlockSparse) -> torch.Tensor:
    """K linear layers at once whose weights are `pattern`'s kept `values`: x [K, B, in], bias [K, out]
    -> [K, B, out]. The input needs no gradient (it is the data: the first layer)."""
    if torch.is_grad_enabled():
        return _BlockSparseLinear.apply(x, values, bias, pattern)
    # evaluation builds no graph, so it skips the copy of x the backward would need
    return _product(x, pattern.matrix(values), bias)


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [K, B, in] times the block-diagonal CSR `weight` [K * out, K * in], plus bias [K, out], as one
    product for all K (the inputs stacked network by network down the rows)."""
    K, B, in_ = x.shape
    out = torch.sparse.mm(weight, x.transpose(1, 2).reshape(K * in_, B))
    return out.view(K, -1, B).transpose(1, 2) + bias.unsqueeze(1)


class _BlockSparseLinear(torch.autograd.Function):
    """`_product` with its backward: the weight gradient at the kept positions only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, pattern: BlockSparse) -> torch.Tensor:
        ctx.weight = pattern.matrix(values)  # the forward's product, then the backward's sampling pattern
        ctx.save_for_backward(x.transpose(0, 1).reshape(x.shape[1], -1))  # [B, K * in]: the gradient's layout
        return _product(x, ctx.weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inputs,) = ctx.saved_tensors
        K, B, out = grad.shape
        rows = grad.transpose(1, 2).reshape(K * out, B)
        # d loss / d w[r, c] = sum_b grad[r, b] * x[c, b], computed at the kept (r, c) only
        grad_values = torch.sparse.sampled_addmm(ctx.weight, rows, inputs, beta=0.0).values()
        return None, grad_values, grad.sum(1), None
