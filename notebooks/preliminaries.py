# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Preliminaries: one function, many weights
#
# §2 of the paper starts from a small observation, drawn in its Figure 1: swap two hidden neurons
# of a network — together with the weights that go into them and the weights that leave them — and
# the network computes exactly the same function, although its weight matrices are now different.
# Every trained network is one arbitrary member of such a family of $n!$ permuted copies per hidden
# layer of width $n$, which is why raw weights are a poor description of what a network does.
#
# With layer matrices whose rows are a layer's inputs and whose columns are its neurons, a
# two-layer network computes $y = W_2^\top \sigma(W_1^\top x)$. A permutation matrix $P$ of the
# hidden neurons gives the copy $W_1' = W_1 P$, $W_2' = P^\top W_2$: its hidden vector is
# $h' = P^\top h$ (the same numbers in a new order), and since $P P^\top = I$ its output is
# unchanged. The **chain alignment rule** (§3.2) keeps exactly what the permutation cannot touch:
# the chain Grams $G_1 = W_1 W_1^\top$ and $G_2 = W_1 W_2 W_2^\top W_1^\top$.
#
# The example below is small enough to check by eye. (The paper's own Figure 1 numbers could not be
# transcribed for this edition; this example is ours, built so that the permuted hidden vector is
# $(0.7, 0.2, 0.5)$ as in the paper's figure.)

# %% tags=["parameters"]
profile = "smoke"  # no sizes matter here; kept so every chapter takes the same parameters

# %%
import pandas as pd
import torch
from IPython.display import Markdown, display
from myst_nb import glue

import ffl.chain
import ffl.models
import ffl.permute
import ffl.provenance

display(Markdown(ffl.provenance.markdown_table(ffl.provenance.run_info(profile=profile))))

# %% [markdown]
# ## The network and its permuted copy
#
# Two inputs, three hidden ReLU neurons, two outputs, no biases. The permutation moves hidden
# neurons (1, 2, 3) to positions (3, 1, 2).

# %%
x = torch.tensor([[1.0, 2.0]])
W1 = torch.tensor([[0.1, 0.3, 0.4],
                   [0.2, 0.2, -0.1]])  # rows = inputs, columns = hidden neurons
W2 = torch.tensor([[0.5, -0.3],
                   [0.1, 0.6],
                   [-0.4, 0.2]])  # rows = hidden neurons, columns = outputs
perm = torch.tensor([1, 2, 0])  # new neuron i is old neuron perm[i]

net = ffl.models.MLP.from_layer_matrices([W1, W2])
permuted = ffl.permute.permute_hidden(net, [perm])

h, h_perm = net.hidden_activations(x)[0], permuted.hidden_activations(x)[0]
y, y_perm = net(x), permuted(x)
pd.DataFrame({
    "original": [h.tolist()[0], y.tolist()[0]],
    "permuted": [h_perm.tolist()[0], y_perm.tolist()[0]],
}, index=["hidden h₁", "output y"]).map(lambda v: "(" + ", ".join(f"{a:.2f}" for a in v) + ")")

# %% [markdown]
# The hidden vector is the same three numbers in another order, and the output is identical.
# The weights are not:

# %%
W1p, W2p = ffl.chain.layer_matrices(permuted)
display(Markdown(
    "| | original | permuted |\n|---|---|---|\n"
    f"| $W_1$ | `{W1.tolist()}` | `{W1p.tolist()}` |\n"
    f"| $W_2$ | `{W2.tolist()}` | `{W2p.tolist()}` |\n"
))

# %% [markdown]
# ## What the chain alignment rule keeps
#
# The chain Grams of the two copies agree to rounding, although their weights differ:

# %%
rows = []
for l, (c, cp) in enumerate(zip(ffl.chain.chain_factors(net), ffl.chain.chain_factors(permuted)), 1):
    g, gp = ffl.chain.chain_gram(c), ffl.chain.chain_gram(cp)
    w, wp = ffl.chain.layer_matrices(net)[l - 1], ffl.chain.layer_matrices(permuted)[l - 1]
    rows.append({"index l": l, "max |W_l − W_l'|": (w - wp).abs().max().item(),
                 "max |G_l − G_l'|": (g - gp).abs().max().item(), "G_l": g.round(decimals=4).tolist()})
check = pd.DataFrame(rows).set_index("index l")
glue("max_weight_change", float(check["max |W_l − W_l'|"].max()), display=False)
glue("max_gram_change", float(check["max |G_l − G_l'|"].max()), display=False)
glue("output_change", (y - y_perm).abs().max().item(), display=False)
check

# %% [markdown]
# Permuting the hidden neurons changes the weights by up to {glue:text}`max_weight_change:.2f`,
# the output by {glue:text}`output_change:.1e` and the chain Grams by
# {glue:text}`max_gram_change:.1e`. The {doc}`alignment_proof_check` chapter repeats this check
# for every architecture of the paper, with many random permutations.
