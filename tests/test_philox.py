"""The integer-op Philox matches Triton's tl.randint4x / tl.rand bit for bit."""

import pytest
import torch

from dnops.reference.philox import philox4x32, randint4x, uint32_to_uniform


def test_known_answer():
    # tl.randint4x(1234, arange(8))[0][0] from the Triton interpreter, as int32 (FACTS.md).
    first = randint4x(1234, torch.arange(8))[0][0].item()
    assert first == 546353992


def test_words_are_uint32_and_uniforms_in_range():
    words = randint4x(2**40 + 7, torch.arange(4096) * 977 + (5 << 32))
    for w in words:
        assert int(w.min()) >= 0 and int(w.max()) < 2**32
    u = uint32_to_uniform(torch.cat(words))
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12 / u.numel()) ** 0.5


def test_counter_words_differ():
    a = philox4x32(1, torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    b = philox4x32(1, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([0]))
    assert [int(x) for x in a] != [int(x) for x in b]


@pytest.mark.triton
def test_matches_triton_interpreter():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(out_ptr, uni_ptr, off_ptr, seed, n, BLOCK: tl.constexpr):
        idx = tl.arange(0, BLOCK)
        mask = idx < n
        off = tl.load(off_ptr + idx, mask=mask)
        r0, r1, r2, r3 = tl.randint4x(seed, off)
        tl.store(out_ptr + idx * 4 + 0, r0.to(tl.int64, bitcast=False) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + idx * 4 + 1, r1.to(tl.int64, bitcast=False) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + idx * 4 + 2, r2.to(tl.int64, bitcast=False) & 0xFFFFFFFF, mask=mask)
        tl.store(out_ptr + idx * 4 + 3, r3.to(tl.int64, bitcast=False) & 0xFFFFFFFF, mask=mask)
        tl.store(uni_ptr + idx, tl.rand(seed, off), mask=mask)

    offsets = torch.tensor([0, 1, 2, 77, 2**31 + 5, (3 << 32) | 11, (41 << 32) | 2**31], dtype=torch.int64)
    seed = (17 << 32) | 123456789
    out = torch.zeros(len(offsets), 4, dtype=torch.int64)
    uni = torch.zeros(len(offsets), dtype=torch.float32)
    kernel[(1,)](out, uni, offsets, seed, len(offsets), BLOCK=8)
    expected = torch.stack(randint4x(seed, offsets), -1)
    assert torch.equal(out, expected)
    assert torch.equal(uni, uint32_to_uniform(expected[:, 0]))
