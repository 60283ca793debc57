"""The cpu kernels' own matrix product (csrc/cpu/panel_matmul.h, panel::gemm), which the
adaptive softmax runs its products on: against the float64 product, on the shapes that
reach each of its paths (row-tile tails, a partial last column panel, several blocks of
rows and of k, a transposed A far apart in k that it packs, B in any strides, an
accumulating call), the BLAS fallbacks (fewer than 16 columns, float64), and the same bits
on 1 and 2 threads.
"""
import math

import pytest
import torch

try:
    from cprec_kernels import _C
except ImportError:  # the extension is not built: nothing to test here
    pytest.skip("the C++ extension is not built", allow_module_level=True)


def _operand(rows: int, cols: int, transposed: bool, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """A [rows, cols] operand, contiguous or as the transpose of a [cols, rows] tensor."""
    if transposed:
        return torch.randn(cols, rows, generator=gen, dtype=dtype).t()
    return torch.randn(rows, cols, generator=gen, dtype=dtype)


def _check(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, acc=None) -> None:
    ref = a.double() @ b.double()
    if acc is not None:
        ref = ref + acc.double()
    k = a.shape[1]
    # float32 sums of k products of unit normals: error ~ sqrt(k) * eps per entry
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=8e-6 * math.sqrt(max(k, 1)))


# (M, K, N, A transposed, B transposed); M >= 64, below which BLAS runs the product
CASES = [
    (65, 1, 16, False, False),      # one k, a row-tile tail of 5
    (67, 63, 17, False, True),      # a tail of 1, a partial panel of 1 column
    (70, 64, 31, True, False),      # a tail of 4, exactly one block of k
    (69, 65, 40, True, True),       # a tail of 3, a block of k and one k more
    (146, 257, 48, False, False),   # two row blocks (144 + 2), two depth blocks (256 + 1)
    (300, 300, 2003 % 64 + 16, True, False),
    (1030, 70, 20, True, False),    # A transposed with k's 1030 floats apart: packed
    (1100, 300, 33, True, True),    # packed, over two depth blocks, B transposed
]


@pytest.mark.parametrize("m,k,n,a_t,b_t", CASES)
def test_panel_mm_matches_float64(m, k, n, a_t, b_t):
    gen = torch.Generator().manual_seed(m * 7 + k * 3 + n)
    a, b = _operand(m, k, a_t, gen), _operand(k, n, b_t, gen)
    _check(_C.panel_mm(a, b), a, b)


@pytest.mark.parametrize("m,k,n,a_t,b_t", [CASES[1], CASES[4], CASES[6]])
def test_panel_mm_accumulates(m, k, n, a_t, b_t):
    gen = torch.Generator().manual_seed(11)
    a, b = _operand(m, k, a_t, gen), _operand(k, n, b_t, gen)
    acc = torch.randn(m, n, generator=gen)
    before = acc.clone()
    _check(_C.panel_mm(a, b, acc), a, b, acc)
    assert torch.equal(acc, before)  # the hook accumulates into a copy


def test_panel_mm_packs_rows_that_are_not_adjacent():
    """A with its rows 2 floats apart and its k's 1,200 apart: packed, row by row."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(45, 1200, generator=gen)[:, ::2].t()  # [600, 45], strides (2, 1200)
    b = torch.randn(45, 24, generator=gen)
    _check(_C.panel_mm(a, b), a, b)


def test_panel_mm_empty_sum_is_zero():
    a, b = torch.randn(70, 0), torch.randn(0, 32)
    assert torch.equal(_C.panel_mm(a, b), torch.zeros(70, 32))
    acc = torch.randn(70, 32)
    assert torch.equal(_C.panel_mm(a, b, acc), acc)


@pytest.mark.parametrize("m,n,dtype", [(80, 4, torch.float32), (80, 15, torch.float32), (80, 40, torch.float64),
                                       (63, 40, torch.float32), (1, 40, torch.float32)])
def test_panel_mm_blas_fallbacks(m, n, dtype):
    """Fewer than 16 columns, float64 or fewer than 64 rows: BLAS, the same results as torch.mm."""
    gen = torch.Generator().manual_seed(n)
    a, b = _operand(m, 50, True, gen, dtype), _operand(50, n, False, gen, dtype)
    torch.testing.assert_close(_C.panel_mm(a, b), torch.mm(a, b), rtol=0, atol=0)


def test_panel_mm_rejects_mismatched_shapes():
    with pytest.raises(RuntimeError, match="do not match"):
        _C.panel_mm(torch.randn(4, 5), torch.randn(6, 16))


def test_panel_mm_same_bits_on_one_and_two_threads():
    """Rows are split across threads and each entry's sum has one order: the result
    does not depend on the thread count (large enough to run in parallel)."""
    gen = torch.Generator().manual_seed(5)
    a, b = _operand(301, 260, True, gen), _operand(260, 72, False, gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _C.panel_mm(a, b)
        torch.set_num_threads(2)
        two = _C.panel_mm(a, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
