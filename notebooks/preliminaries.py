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
# With layer matrices whose rows are a layer's inputs and whose columns are its neurons (the
# paper's $W_l \in \mathbb{R}^{n_{l-1} \times n_l}$), a linear network maps $x$ to
# $h_1 = W_1^\top x$ and $h_2 = W_2^\top h_1$. A permutation matrix $P$ of the hidden neurons gives
# the copy $W_1' = W_1 P$, $W_2' = P^\top W_2$: its hidden vector is $h_1' = P^\top h_1$ (the same
# numbers in a new order), and since $P P^\top = I$ the rest of the network sees no change. The
# **chain alignment rule** (§3.2) keeps exactly what the permutation cannot touch: the chain Grams
# $G_1 = W_1 W_1^\top$ and $G_2 = W_1 W_2 W_2^\top W_1^\top$.
#
# This chapter checks the paper's own example, with the numbers of its Figure 1.

# %% tags=["parameters"]
profile = "smoke"  # no sizes matter here; kept so every chapter takes the same parameters

# %%
import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

import ffl.paper
import ffl.provenance
from ffl.paper import H1, H1_PERMUTED, SWAP, W1, W1_PERMUTED, W2, W2_PERMUTED

display(Markdown(ffl.provenance.markdown_table(ffl.provenance.run_info(profile=profile))))
pd.set_option("display.max_colwidth", None)  # print the paper's matrices in full


def two_decimals(values, index=None, columns=None) -> pd.DataFrame:
    """A matrix or vectors as the paper prints them: two decimals, float64 (no float32 noise)."""
    return pd.DataFrame(np.atleast_2d(values), index=index, columns=columns).map("{:.2f}".format)


# %% [markdown]
# ## The paper's network and its permuted copy
#
# Figure 1 shows a linear MLP with two inputs $x = (x_1, x_2)$, two hidden layers of three neurons
# and two outputs; the paper prints the first two weight matrices, in MATLAB notation with a
# transpose, and the same two after hidden neurons 1 and 2 of $h_1$ have been swapped:

# %%
names = ["W₁", "W₂", "W₁'", "W₂'"]
printed = [W1, W2, W1_PERMUTED, W2_PERMUTED]
pd.DataFrame({"as the paper writes it": [ffl.paper.paper_notation(w) for w in printed],
              "shape (rows = inputs, columns = neurons)": [" × ".join(map(str, w.shape)) for w in printed]},
             index=names)

# %% [markdown]
# Read with the paper's convention, $W_1$ is $2 \times 3$: row $i$ holds the weights leaving
# input $x_i$, column $j$ those entering hidden neuron $j$. $W_2$ is $3 \times 3$ with one row per
# neuron of $h_1$:

# %%
x_names, h1_names, h2_names = ["x₁", "x₂"], ["h₁₁", "h₁₂", "h₁₃"], ["h₂₁", "h₂₂", "h₂₃"]
display(pd.concat({"W₁": two_decimals(W1, x_names, h1_names),
                   "W₁' (printed)": two_decimals(W1_PERMUTED, x_names, h1_names)}, axis=1))
display(pd.concat({"W₂": two_decimals(W2, h1_names, h2_names),
                   "W₂' (printed)": two_decimals(W2_PERMUTED, h1_names, h2_names)}, axis=1))

# %% [markdown]
# ## The permutation, applied by the library
#
# Swapping hidden neurons 1 and 2 is the permutation $(2, 1, 3)$. Applied to the network with
# `ffl.permute.permute_hidden`, it moves columns 1 and 2 of $W_1$ and rows 1 and 2 of $W_2$ — and
# gives the paper's $W_1'$ and $W_2'$ exactly:

# %%
inputs = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0], [-1.0, 3.0]])
check = ffl.paper.figure_1_check(inputs)
moved = pd.DataFrame({
    "permute_hidden gives": [ffl.paper.paper_notation(w) for w in check["moved"]],
    "the paper prints": [ffl.paper.paper_notation(w) for w in (W1_PERMUTED, W2_PERMUTED)],
}, index=["W₁'", "W₂'"])
n_entries = sum(w.size for w in check["moved"])
n_differ = sum(int((w != p).sum()) for w, p in zip(check["moved"], (W1_PERMUTED, W2_PERMUTED)))
glue("n_entries", n_entries, display=False)
glue("n_differ", n_differ, display=False)
glue("max_weight_change", float(max(np.abs(W1 - W1_PERMUTED).max(), np.abs(W2 - W2_PERMUTED).max())),
     display=False)
moved

# %% [markdown]
# Of the {glue:text}`n_entries` permuted weights, {glue:text}`n_differ` differ from the printed
# ones (compared exactly, in float64), although the weights themselves moved by up to
# {glue:text}`max_weight_change:.2f`.
#
# The same permutation acts on the hidden vector: the paper's $h_1 = (0.2, 0.7, 0.5)$ becomes
# $h_1' = (0.7, 0.2, 0.5)$ — its first two numbers swapped, as printed:

# %%
two_decimals([H1, H1[list(SWAP)], H1_PERMUTED], ["h₁ (printed)", "h₁ permuted", "h₁' (printed)"], h1_names)

# %%
x_closest, residual = ffl.paper.figure_1_h1_least_squares()
glue("h1_residual", residual, display=False)
for j, v in enumerate(W1.T @ x_closest, 1):
    glue(f"h1_closest_{j}", float(v), display=False)

# %% [markdown]
# The paper's $h_1$ is illustrative: no input produces it through the printed $W_1$. $W_1^\top$ is
# $3 \times 2$, so $W_1^\top x$ can only reach a plane of hidden vectors; the closest point of that
# plane to $h_1$ (least squares) is ({glue:text}`h1_closest_1:.2f`, {glue:text}`h1_closest_2:.2f`,
# {glue:text}`h1_closest_3:.2f`), at a distance of
# {glue:text}`h1_residual:.2f` from $h_1$. The permutation does not care: it reorders whatever
# vector the neurons hold.
#
# ## One function
#
# For a few inputs, the two networks of Figure 1 give the same $h_2 = W_2^\top W_1^\top x$:

# %%
h2 = inputs @ W1 @ W2  # row form of W₂ᵀW₁ᵀx, one input per row
h2_permuted = inputs @ W1_PERMUTED @ W2_PERMUTED
glue("n_inputs", len(inputs), display=False)
glue("output_change", check["max_output_diff"], display=False)
glue("relu_output_change", check["max_relu_output_diff"], display=False)
pd.concat({"x": two_decimals(inputs, columns=x_names),
           "W₂ᵀW₁ᵀx": two_decimals(h2, columns=h2_names),
           "W₂'ᵀW₁'ᵀx": two_decimals(h2_permuted, columns=h2_names)}, axis=1)

# %% [markdown]
# Over these {glue:text}`n_inputs` inputs the two outputs differ by at most
# {glue:text}`output_change:.1e` — float64 rounding, since the permuted network adds the same
# products in another order. With a ReLU on $h_1$ the difference is
# {glue:text}`relu_output_change:.1e`: an activation applied neuron by neuron moves with its neuron.
#
# ## What the chain alignment rule keeps
#
# The chain Grams of the two networks, computed by `ffl.chain` from the printed matrices (both are
# $2 \times 2$, indexed by the inputs; their entries are exact at four decimals):

# %%
grams = {}
for l, (g, gp) in enumerate(zip(check["grams"], check["grams_permuted"]), 1):
    g_name = "G" + "₀₁₂₃"[l]
    grams[f"{g_name} from W₁, W₂"] = pd.DataFrame(g, x_names, x_names).map("{:.4f}".format)
    grams[f"{g_name}' from W₁', W₂'"] = pd.DataFrame(gp, x_names, x_names).map("{:.4f}".format)
glue("max_gram_change", max(check["max_gram_diff"]), display=False)
pd.concat(grams, axis=1)

# %% [markdown]
# Permuting the hidden neurons changed the weights by up to {glue:text}`max_weight_change:.2f`,
# but the outputs only by {glue:text}`output_change:.1e` and the chain Grams by
# {glue:text}`max_gram_change:.1e` (rounding). The {doc}`alignment_proof_check` chapter repeats
# this check for every architecture of the paper, with many random permutations.
