"""Relative logit errors of our loaders against transformers' Mamba2ForCausalLM (CPU, float32).

Builds the random tiny models of tests/test_convert.py (untied with 2 groups, tied with 1 group), loads them in
the Hugging Face format, the state-spaces format (pytorch_model.bin and safetensors) and through our export, and
prints max|ours - theirs| / max|theirs|. Usage: python benchmarks/checkpoint_parity.py
"""

import os
import sys
import tempfile

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import transformers  # noqa: E402
from test_convert import VOCAB, random_hf_model, rel_err, torch_logits, write_state_spaces  # noqa: E402

import ssm_jax  # noqa: E402


def main() -> None:
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 45))
    print("| model | path | relative error |\n|---|---|---|")
    for tie, groups in ((False, 2), (True, 1)):
        name = f"{'tied' if tie else 'untied'}, G={groups}"
        hf = random_hf_model(tie, groups)
        want = torch_logits(hf, ids)
        root = tempfile.mkdtemp()
        hf.save_pretrained(os.path.join(root, "hf"))
        for impl in ("xla", "recurrent"):
            model = ssm_jax.from_pretrained(os.path.join(root, "hf"), ssd_impl=impl)
            print(f"| {name} | Hugging Face format, impl={impl} | {rel_err(model(jnp.asarray(ids)), want):.2e} |")
        for use_bin in (True, False):
            path = write_state_spaces(hf, os.path.join(root, f"ss_{use_bin}"), use_bin=use_bin)
            model = ssm_jax.from_pretrained(path, ssd_impl="xla")
            kind = "pytorch_model.bin" if use_bin else "model.safetensors"
            print(f"| {name} | state-spaces format, {kind} | {rel_err(model(jnp.asarray(ids)), want):.2e} |")
        ssm_jax.save_hf(model, os.path.join(root, "export"))
        reloaded = transformers.Mamba2ForCausalLM.from_pretrained(os.path.join(root, "export")).eval()
        ours = np.asarray(model(jnp.asarray(ids)))
        print(f"| {name} | our export reloaded in transformers vs ours | {rel_err(torch_logits(reloaded, ids), ours):.2e} |")


if __name__ == "__main__":
    main()
