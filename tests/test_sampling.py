"""Sampling truncations against their definitions: the support sets of top-k, top-p and min-p on known
distributions, and draws that cover exactly the support with the renormalised frequencies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssm_jax.sampling import check_sampling_args, filter_logits, sample

PROBS = np.array([0.05, 0.40, 0.10, 0.30, 0.15])  # sorted: 1 (0.40), 3 (0.30), 4 (0.15), 2 (0.10), 0 (0.05)


def support(logits, **kwargs):
    kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits)[None], **kwargs))[0])
    return set(np.flatnonzero(kept).tolist())


def top_p_by_definition(probs, p):
    """The smallest set of most probable tokens whose probability reaches p."""
    order = np.argsort(-probs, kind="stable")
    mass, kept = 0.0, set()
    for i in order:
        if mass >= p:
            break
        kept.add(int(i))
        mass += probs[i]
    return kept


@pytest.mark.parametrize(
    "kwargs,want",
    [
        (dict(top_k=1), {1}),
        (dict(top_k=2), {1, 3}),
        (dict(top_k=5), {0, 1, 2, 3, 4}),
        (dict(top_p=0.35), {1}),
        (dict(top_p=0.6), {1, 3}),
        (dict(top_p=0.75), {1, 3, 4}),
        (dict(top_p=0.9), {1, 2, 3, 4}),
        (dict(top_p=1.0), {0, 1, 2, 3, 4}),
        (dict(min_p=0.3), {1, 3, 4}),
        (dict(min_p=0.5), {1, 3}),
        (dict(min_p=0.0), {0, 1, 2, 3, 4}),
        (dict(min_p=1.0), {1}),
        (dict(top_k=3, top_p=0.6), {1, 3}),  # top-p on what top-k kept, renormalised: 0.4/0.85 < 0.6 <= 0.7/0.85
        (dict(top_k=3, top_p=0.5), {1, 3}),  # 0.4 / 0.85 = 0.47 < 0.5: the second token is needed
        (dict(top_p=0.9, min_p=0.3), {1, 3, 4}),
    ],
)
def test_support_sets_on_a_known_distribution(kwargs, want):
    assert support(np.log(PROBS), **kwargs) == want


def test_top_p_matches_its_definition_on_random_distributions():
    rng = np.random.default_rng(0)
    for _ in range(50):
        probs = rng.dirichlet(np.full(12, 0.5))
        p = float(rng.uniform(0.05, 0.99))
        if np.min(np.abs(np.cumsum(np.sort(probs)[::-1]) - p)) < 1e-5:
            continue  # a cumulative sum within rounding of p: either answer is right
        assert support(np.log(probs), top_p=p) == top_p_by_definition(probs, p)


def test_ties_at_the_cut_are_kept():
    logits = np.log(np.array([0.3, 0.3, 0.3, 0.1]))
    assert support(logits, top_k=2) == {0, 1, 2}
    assert support(logits, top_p=0.5) == {0, 1, 2}


def test_draws_cover_the_support_with_renormalised_frequencies():
    n = 20000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS, jnp.float32)), (n, 5))
    draws = np.asarray(sample(logits, jax.random.PRNGKey(0), temperature=1.0, top_p=0.75))
    counts = np.bincount(draws, minlength=5) / n
    kept = np.array([0, 0.40, 0, 0.30, 0.15]) / 0.85
    np.testing.assert_allclose(counts, kept, atol=0.015)
    hot = np.asarray(sample(logits, jax.random.PRNGKey(1), temperature=0.5))  # p^2 renormalised
    np.testing.assert_allclose(np.bincount(hot, minlength=5) / n, PROBS**2 / np.sum(PROBS**2), atol=0.015)
    greedy = np.asarray(sample(logits[:3], jax.random.PRNGKey(2), temperature=0.0, top_p=0.1))
    np.testing.assert_array_equal(greedy, [1, 1, 1])


def test_padded_vocabulary_is_never_drawn():
    logits = jnp.zeros((64, 8)).at[:, 5:].set(50.0)  # ids 5..7 are padding rows of the embedding
    for temperature in (0.0, 1.0):
        assert int(sample(logits, jax.random.PRNGKey(0), temperature=temperature, vocab_size=5).max()) < 5


@pytest.mark.parametrize(
    "args,name",
    [
        ((-0.1, None, None, None), "temperature"),
        ((1.0, 0, None, None), "top_k"),
        ((1.0, 9, None, None), "top_k"),
        ((1.0, None, 0.0, None), "top_p"),
        ((1.0, None, 1.5, None), "top_p"),
        ((1.0, None, None, -0.1), "min_p"),
        ((1.0, 2.5, None, None), "top_k"),
    ],
)
def test_bad_arguments_are_named(args, name):
    with pytest.raises(ValueError, match=name):
        check_sampling_args(*args, vocab_size=8)
