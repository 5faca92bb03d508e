"""DiT attention-guidance kernels: joint-attention PAG and grid query blur (pure torch)."""

import pytest
import torch

from patchlab.kernels import attention as ka


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def masked_reference(q, k, v, text, image):
    """Full softmax attention with a mask letting each image query see the text keys and its own key."""
    n = q.shape[2]
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:, text[0]:text[1]] = True
    allowed |= torch.eye(n, dtype=torch.bool)
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    return (weights @ v)[:, :, image[0]:image[1]]


@pytest.mark.parametrize("text,image", [((0, 5), (5, 17)), ((12, 17), (0, 12))])
@pytest.mark.parametrize("chunk", [1024, 5])
def test_joint_identity_attention_equals_the_masked_attention(text, image, chunk):
    q, k, v = rand(2, 3, 17, 8, seed=1), rand(2, 3, 17, 8, seed=2), rand(2, 3, 17, 8, seed=3)
    torch.testing.assert_close(ka.joint_identity_attention(q, k, v, text, image, query_chunk=chunk),
                               masked_reference(q, k, v, text, image), rtol=1e-5, atol=1e-6)


def test_joint_identity_attention_without_text_is_the_identity():
    q, k, v = rand(1, 2, 9, 4, seed=1), rand(1, 2, 9, 4, seed=2), rand(1, 2, 9, 4, seed=3)
    torch.testing.assert_close(ka.joint_identity_attention(q, k, v, (0, 0), (0, 9)), v)


def test_joint_identity_attention_keeps_the_dtype():
    q = rand(1, 2, 6, 4).to(torch.bfloat16)
    assert ka.joint_identity_attention(q, q, q, (0, 2), (2, 6)).dtype == torch.bfloat16


def test_grid_blur_leaves_text_and_reference_tokens_untouched():
    q = rand(2, 3, 4 + 6 + 3, 5)
    out = ka.blur_grid_queries(q, 4, (2, 3), sigma=2.0)
    assert torch.equal(out[:, :, :4], q[:, :, :4]) and torch.equal(out[:, :, 10:], q[:, :, 10:])
    assert not torch.allclose(out[:, :, 4:10], q[:, :, 4:10])


def test_grid_blur_matches_the_unet_query_blur_on_the_grid_tokens():
    q = rand(1, 2, 3 + 12, 4)
    grid_tokens = q[:, :, 3:].transpose(1, 2).reshape(1, 12, 8)
    expected = ka.blur_queries(grid_tokens, (3, 4), 1.5).reshape(1, 12, 2, 4).transpose(1, 2)
    torch.testing.assert_close(ka.blur_grid_queries(q, 3, (3, 4), 1.5)[:, :, 3:], expected)


def test_infinite_grid_blur_is_the_mean_grid_query():
    q = rand(1, 2, 2 + 6, 4)
    out = ka.blur_grid_queries(q, 2, (2, 3), ka.INFINITE_BLUR)
    torch.testing.assert_close(out[:, :, 2:], q[:, :, 2:].mean(dim=2, keepdim=True).expand(1, 2, 6, 4))


def test_a_video_grid_is_blurred_frame_by_frame():
    """SEG on a [t, h, w] grid: each frame's queries are blurred on their own, as that frame alone would be."""
    q = rand(2, 3, 1 + 3 * 6, 4)
    out = ka.blur_grid_queries(q, 1, (3, 2, 3), sigma=2.0)
    for frame in range(3):
        tokens = slice(1 + 6 * frame, 1 + 6 * (frame + 1))
        alone = ka.blur_grid_queries(q[:, :, tokens], 0, (2, 3), sigma=2.0)
        torch.testing.assert_close(out[:, :, tokens], alone)
    assert torch.equal(out[:, :, :1], q[:, :, :1])


def test_infinite_video_blur_is_each_frames_mean_query():
    q = rand(1, 2, 2 * 4, 4)
    out = ka.blur_grid_queries(q, 0, (2, 2, 2), ka.INFINITE_BLUR)
    for frame in range(2):
        frame_tokens = slice(4 * frame, 4 * (frame + 1))
        tokens = q[:, :, frame_tokens]
        torch.testing.assert_close(out[:, :, frame_tokens], tokens.mean(dim=2, keepdim=True).expand_as(tokens))
