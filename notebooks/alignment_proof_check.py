# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Alignment proof check
#
# The paper's central claim rests on one identity: the chain Grams of §3.2 are *exactly* invariant
# to every permutation of hidden neurons that leaves a network's function unchanged, while the raw
# weights are not. The paper derives it for a linear MLP and covers the other architectures with a
# sentence ("a CNN can be regarded as a patch-based MLP"). This chapter states the chain of every
# architecture of the paper precisely, built as the authors' code builds it — PlainNet-5 and
# PlainNet-6 with BatchNorm, ResNet-5 with its projection shortcuts, leaky-ReLU variants, and the
# two-layer GRU — and checks the invariance
# numerically: many random permutations, applied to every hidden layer at once, must leave the
# outputs and every chain feature unchanged up to rounding, and permutations that are *not*
# function-preserving must change both. Finally it measures what the chains cost, because the
# paper's CNN chain 4 hit a memory wall ("72G GPU memory even though the batch size is 1") that
# the factored form of the chain removes.
#
# The definitions live in the library (`ffl.chain`, `ffl.permute`) and so does the check
# (`ffl.invariance`); this chapter only calls them.

# %% tags=["parameters"]
profile = "smoke"  # sizes: "smoke" (a minute on a CPU), "laptop" (the book's narrow widths) or "paper" (full widths)
seed = 0  # seeds the networks, the inputs and the permutations
device = "cpu"  # "cpu" or "cuda"

# %%
import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display
from myst_nb import glue

import ffl.checks
import ffl.invariance
import ffl.plots
import ffl.profile_settings
import ffl.provenance

seed, device = ffl.checks.check_parameters(seed=seed, device=device).values()  # checked, normalized
cfg = ffl.profile_settings.load(profile).settings["alignment_proof_check"]
# Exact single precision on GPUs too: TF32 convolutions would round at ~1e-3 and hide the check.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
display(Markdown(ffl.provenance.markdown_table(ffl.provenance.run_info(
    device=device, profile=profile, seed=seed, permutations=cfg["permutations"]))))

# %% [markdown]
# ## The symmetry
#
# Write every layer as a matrix $W_l$ whose rows are the layer's inputs and whose columns are its
# neurons. A permutation matrix $P$ of hidden layer $k$ maps $W_k \to W_k P$ and
# $W_{k+1} \to P^\top W_{k+1}$ (with the biases, BatchNorm parameters and running statistics of
# layer $k$ permuted alongside); the network computes the same function. The chain factor
# $C_l = W_1 \cdots W_l$ becomes $C_l P$ when $l = k$ and is unchanged otherwise, so the chain Gram
# $G_l = C_l C_l^\top$ is invariant. The chain of every architecture below is built so that the
# same two lines prove its invariance: each admissible permutation acts on the chain factor by a
# permutation of its columns.
#
# ### PlainNet-5 and PlainNet-6: chains in patch space
#
# PlainNet-5 is conv3×3(32)–BN–act–maxpool, conv(64)…pool, conv(128)…pool, conv(256)–BN–act,
# global average pooling, FC(256, N); PlainNet-6 (the official `cfg['I']`) pools after conv(256)
# too and adds a fifth conv(256)–BN–act unit on 2×2 maps. Conv layer
# $l$ with kernel $K_l \in \mathbb{R}^{n_l \times n_{l-1} \times 3 \times 3}$ has the layer matrix
# $M_l[(i, p), j] = K_l[j, i, p]$ (input channel $i$, kernel position $p$; output channel $j$).
# Regarding the CNN as a patch-based MLP, layer $l$ sees a 3×3 patch of layer-$(l-1)$ neurons,
# each of which sees its own patch below; ignoring the overlap of neighbouring receptive fields and
# the pooling, the chain lives in the space of these trees of patches:
#
# $$C_1 = M_1 \in \mathbb{R}^{27 \times n_1}, \qquad
#   C_l[(p_l, r), j] = \sum_i C_{l-1}[r, i]\, M_l[(i, p_l), j], \qquad
#   d_l = 27 \cdot 9^{\,l-1},$$
#
# i.e. $C_l = (I_9 \otimes C_{l-1}) \hat M_l$, of dimension 27, 243, 2187 and 19683 for chains
# 1–4. Global average pooling does not mix channels, so the classifier continues the chain as in
# an MLP, $C_{L+1} = C_L W_{\mathrm{fc}}^\top$. Permuting the channels of layer $l$ permutes the
# columns of $C_l$ and the rows of $\hat M_{l+1}$ by $I_9 \otimes P^\top$, which cancel.
#
# **BatchNorm** enters by folding: in eval mode
# $\mathrm{BN}(y) = \gamma (y-\mu)/\sqrt{\sigma^2+\epsilon} + \beta$, so the chain uses the kernel of channel $j$ scaled by
# $\gamma_j/\sqrt{\sigma_j^2+\epsilon}$ (the shift is a bias and, like every bias, outside the
# chain). $\gamma, \beta, \mu, \sigma^2$ are permuted with their channel, so the fold is a
# per-neuron scale that commutes with the permutation.
#
# ### ResNet-5: projection shortcuts
#
# ResNet-5, as the official code builds it, is a stem conv3×3(32)–BN–act and three blocks
# $h_l = \mathrm{act}(\mathrm{BN}_l\,\mathrm{conv}_l(h_{l-1}) + \mathrm{BN}'_l\,\mathrm{conv}'_l(h_{l-1}))$,
# where $\mathrm{conv}_l$ is a 3×3 and $\mathrm{conv}'_l$ a 1×1 projection, both of stride 2, then
# global average pooling and FC(256, N). The 1×1 projection reads exactly the pixel that the centre
# of the 3×3 kernel reads, so a block's linear part is one 3×3 convolution: its layer matrix is
# $M_l + E_l$ with $E_l[(i, \text{centre}), j] = S_l[j, i]$ (the projection's weights). A
# permutation of a block's channels permutes the outputs of both convolutions and both BatchNorms
# and the inputs of the next block's two convolutions, so $E_l$ transforms exactly like $M_l$ and
# the chain is invariant; the projections have weights of their own, so the permutations of
# different layers are independent. The official code takes the 3×3 kernels alone (it skips every
# kernel that is not 3×3); those are invariant by the PlainNet argument and are checked below too.
#
# ### GRU-2: gates and recurrence
#
# A hidden permutation of GRU layer $k$ permutes the rows of each gate block $r, z, n$ of
# $W_{ih}^{(k)}$, $W_{hh}^{(k)}$ and the biases identically, the columns of the recurrent
# $W_{hh}^{(k)}$ too, and the columns of the next layer's $W_{ih}^{(k+1)}$ (or of the classifier).
# The official feature is $C_1 = W_{ih}^{(1)\top}$ (58 × 3H, gates as column blocks). The full
# chain follows the input through both layers and through time, along the candidate path
# $h_t = W_{in} x_t + W_{hn} h_{t-1}$: with responses $R^{(k)}[s]$ of layer $k$'s state to
# $x_{t-s}$ and gate responses $A_g^{(k)}[s] = W_{ig}^{(k)} R^{(k-1)}[s] + W_{hg}^{(k)} R^{(k)}[s-1]$,
# chain $k$ has rows (lag $s$, character) and columns (gate, neuron). Each permutation acts on
# $R^{(k)}$ and on every $A_g^{(k)}$ by the same row permutation, so the Grams are invariant; with
# no lags, chain 1 is the official feature.

# %% [markdown]
# ## Invariance under random permutations
#
# Each architecture is built with random weights and random BatchNorm parameters and running
# statistics (fresh BatchNorm layers are the identity, which would make the check too easy). For
# each of the profile's random permutations — one per hidden layer, all at once — we record, at every chain index, the largest change of a raw weight, the
# largest change of an entry of the chain Gram (exact where $G_l$ is small enough to form, else its
# upper bound $\lVert \Delta G_l \rVert_F$ computed without $G$), the relative change
# $\lVert \Delta G_l \rVert_F / \lVert G_l \rVert_F$, and the largest change of an output.

# %%
report = ffl.invariance.check_every_architecture(cfg, seed=seed, device=device)
table = report.table
glue("apc_permutations", cfg["permutations"], display=False)
glue("apc_min_rel_dW", float(table["max_rel_dW"].min()), display=False)
glue("apc_max_dG", float(table["max_abs_dG"].max()), display=False)
glue("apc_max_rel_dG", float(table["max_rel_dG"].max()), display=False)
glue("apc_max_dout", float(table["max_abs_dout"].max()), display=False)
table.style.format({"max_abs_dW": "{:.3f}", "max_rel_dW": "{:.2f}", "max_abs_dG": "{:.1e}", "max_rel_dG": "{:.1e}", "max_abs_dout": "{:.1e}"})

# %% [markdown]
# Over {glue:text}`apc_permutations` random permutations per network, the raw weights of every
# layer change by a relative {glue:text}`apc_min_rel_dW:.2f` or more ($\lVert \Delta W_l \rVert /
# \lVert W_l \rVert$, largest over the draws), while no entry of any chain Gram moves by more than {glue:text}`apc_max_dG:.1e`, no Gram
# changes by more than a relative {glue:text}`apc_max_rel_dG:.1e` in Frobenius norm, and no output
# by more than {glue:text}`apc_max_dout:.1e`: single-precision rounding, for every architecture
# and activation.

# %% mystnb={"figure": {"caption": "Largest relative change under random function-preserving permutations, raw weights $W_l$ against chain Grams $G_l$, over all chain indices and draws (log scale).", "name": "apc-invariance"}}
ffl.plots.invariance_bars(report.rows)
plt.show()

# %% [markdown]
# ### Every chain definition
#
# The table above uses the library's default chains: BatchNorm folded, no chain normalization,
# ResNet-5's projections included, the GRU chain with {glue:text}`apc_gru_lags` lag. The other
# definitions are invariant by the same argument; the next table repeats the check, with fewer
# permutations, for chain normalization (every architecture; the official MLP chain), the raw
# convolution kernels without the BatchNorm fold (the official CNN chains), ResNet-5's 3×3 kernels
# alone (the official ResNet-5 chain) and the official GRU feature (no lags,
# $C_1 = W_{ih}^{(1)\top}$).

# %%
option_table = report.options
glue("apc_gru_lags", cfg["gru_lags"], display=False)
glue("apc_option_max_rel_dG", float(option_table["max_rel_dG"].max()), display=False)
option_table.style.format({"max_rel_dG": "{:.1e}", "min_rel_dW": "{:.2f}"}).hide(axis="index")

# %% [markdown]
# No chain definition moves a Gram by more than a relative {glue:text}`apc_option_max_rel_dG:.1e`.

# %% [markdown]
# ## Permutations that break the function
#
# The check can fail. Permuting only the incoming side of one hidden layer (the next layer still
# reads the neurons in their old order), or, in ResNet-5, permuting a block everywhere except in
# its projection shortcut, changes the network's function — and the chain Gram that reads the
# mismatch changes with it (for the shortcut control, the block's own chain with the projections;
# the official 3×3-only chain cannot see a shortcut).

# %%
controls = report.controls
glue("apc_broken_min_dout", float(controls["max_abs_dout"].min()), display=False)
glue("apc_broken_min_rel_dG", float(controls["rel_dG"].min()), display=False)
controls.style.format({"max_abs_dout": "{:.2e}", "rel_dG": "{:.2f}"})

# %% [markdown]
# Every broken permutation moves some output by at least {glue:text}`apc_broken_min_dout:.1e`
# and the next chain Gram by at least a relative {glue:text}`apc_broken_min_rel_dG:.2f`: the
# invariance above is a property of the function-preserving permutations, not of the check.

# %% [markdown]
# ## Cost: chains without Grams
#
# The Gram $G_l$ of a $d_l$-dimensional chain has $d_l^2$ entries; PlainNet-5's chain 4 lives in
# a 19683-dimensional patch space. Function feature learning only needs inner products of Grams,
# and those follow from the factors:
#
# $$\langle G_a, G_b \rangle_F = \operatorname{tr}(C_a C_a^\top C_b C_b^\top)
#   = \lVert C_a^\top C_b \rVert_F^2 ,$$
#
# an $n_a \times n_b$ matrix (256 × 256 for chain 4). The table measures, for two PlainNet-5
# networks at full width, each chain's size, the time to compute its factor, and the time and peak
# memory (above what was resident before, measured in the run) of the inner product, explicit
# where the profile allows forming $G$ and implicit always.

# %%
cc = cfg["cost"]
cost, factor_seconds = ffl.invariance.chain_costs(cc["arch"], cc["model_kwargs"], explicit_max_dim=cc["explicit_max_dim"],
                                                  seed=seed, device=device)
c4 = cost.loc[4]
glue("apc_chain_factor_seconds", factor_seconds, display=False)
glue("apc_chain4_dim", int(c4["dim d_l"]), display=False)
glue("apc_chain4_gram_gb", float(c4["explicit G_l [MiB]"] / 1024), display=False)
glue("apc_chain4_factor_mb", float(c4["factor C_l [MiB]"]), display=False)
glue("apc_chain4_implicit_s", float(c4["implicit time [s]"]), display=False)
glue("apc_chain4_implicit_peak_mb", float(c4["implicit peak [MiB]"] or 0.0), display=False)
cost.style.format(precision=3, na_rep="not formed")

# %% [markdown]
# All chain factors of a full-width PlainNet-5 take {glue:text}`apc_chain_factor_seconds:.2f` s
# to compute. Chain 4 has dimension {glue:text}`apc_chain4_dim`: its explicit Gram would take
# {glue:text}`apc_chain4_gram_gb:.2f` GiB in single precision, per network, while its factor takes
# {glue:text}`apc_chain4_factor_mb:.1f` MiB, and the inner product of two chain-4 Grams took
# {glue:text}`apc_chain4_implicit_s:.2f` s with a measured peak of
# {glue:text}`apc_chain4_implicit_peak_mb:.1f` MiB above the two factors. Function feature
# learning in kernel form (`ffl.features`) uses only these inner products, so the memory wall of
# the paper's chain 4 does not arise.
