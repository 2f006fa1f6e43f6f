# ---
# jupyter:
#   jupytext:
#     formats: notebooks///ipynb,scripts///py:percent
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
# # Capítulo 03 — Mistura de Especialistas (MoE) que aprende de verdade
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sagui-nlp/nanomoe/blob/main/notebooks/03_train_moe.ipynb)
#
# Num modelo denso, cada token passa por **todos** os pesos do MLP de cada camada. Numa
# Mistura de Especialistas (*Mixture of Experts*, MoE) o MLP vira $E$ MLPs menores — os
# **especialistas** — e um **roteador** escolhe, para cada token, só $k$ deles. O modelo pode ter
# muito mais parâmetros sem gastar mais contas por token: o Mixtral 8x7B tem 47 bilhões de
# parâmetros, mas cada token usa 13 bilhões.
#
# A ideia é simples; os detalhes são traiçoeiros. O MoE do repositório original deste curso não
# aprendia: as probabilidades do roteador nunca multiplicavam a saída dos especialistas (então o
# roteador não recebia gradiente da loss do modelo de linguagem), o segundo especialista do top-2
# **sobrescrevia** o primeiro em vez de somar, a loss de balanceamento tinha a escala errada e a
# capacidade podia chegar a zero na geração. Aqui cada peça é feita do jeito certo — e provada.
#
# | ideia | artigo |
# |---|---|
# | roteador top-k esparso, loss de balanceamento | Shazeer et al. 2017, [*Outrageously Large NNs*][shazeer] |
# | top-1, loss $N\sum_i f_i P_i$, fator de capacidade | Fedus, Zoph & Shazeer 2021, [*Switch Transformers*][switch] |
# | *router z-loss* (estabilidade) | Zoph et al. 2022, [*ST-MoE*][stmoe] |
# | 8 especialistas, top-2, pesos renormalizados, sem descarte | Jiang et al. 2024, [*Mixtral of Experts*][mixtral] |
# | especialistas finos + compartilhados | Dai et al. 2024, [*DeepSeekMoE*][dsmoe] |
# | balanceamento sem loss auxiliar (viés por especialista) | DeepSeek-AI 2024, [*DeepSeek-V3*][dsv3] (seção 2.1.2) |
#
# [shazeer]: https://arxiv.org/abs/1701.06538
# [switch]: https://arxiv.org/abs/2101.03961
# [stmoe]: https://arxiv.org/abs/2202.08906
# [mixtral]: https://arxiv.org/abs/2401.04088
# [dsmoe]: https://arxiv.org/abs/2401.06066
# [dsv3]: https://arxiv.org/abs/2412.19437
#
# O código mora em `nanomoe/moe.py` (a camada) e `nanomoe/course/moe_metrics.py` (as métricas); aqui
# lemos esse código, verificamos cada equação e, no fim, treinamos no Machado de Assis um modelo
# denso contra MoEs com **o mesmo número de parâmetros ativos**. As afirmações sobre o código têm
# testes em `tests/test_03_*.py` (`uv run pytest tests/test_03_*.py`).

# %%
# Set-up: on Colab (or any Jupyter without nanomoe) install the release this notebook was written for.
import importlib.util
import subprocess
import sys

NANOMOE_REF = "v0.3.1"
if importlib.util.find_spec("nanomoe") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    f"nanomoe @ git+https://github.com/sagui-nlp/nanomoe@{NANOMOE_REF}"], check=True)
    importlib.invalidate_caches()

from nanomoe.course.notebook import setup

device = setup("03", written_for=NANOMOE_REF)  # 'cuda', 'mps' or 'cpu'

# %%
import inspect
import time
from collections import Counter
from pathlib import Path

import torch

from nanomoe import GPT, get_tokenizer, modern_config, moe_config
from nanomoe.course.diagrams import plot_moe_dispatch
from nanomoe.course.moe_metrics import MoEMetrics
from nanomoe.course.notebook import show_source
from nanomoe.course.plots import plot_balance_sweep, plot_curves, plot_expert_load, plot_token_routing, save_figure
from nanomoe.data import encode_splits, read_corpus
from nanomoe.dispatch import LocalDispatcher, sort_by_expert
from nanomoe.mlp import MLP
from nanomoe.moe import (
    Experts,
    MoE,
    capacity,
    capacity_keep,
    expert_mlp,
    experts_grouped,
    experts_loop,
    experts_padded,
    moe_layers,
    pick_kernel,
    update_moe_bias,
)
from nanomoe.training.cli import parse_args
from nanomoe.training.train import TrainConfig, train

# %% [markdown]
# ## Parâmetros
#
# Os valores abaixo dão o experimento completo: 8 treinos de 300 passos. Na execução de referência
# (seção 10), numa CPU x86_64 de 2 núcleos compartilhada com outros processos (threads padrão do
# PyTorch), os 8 treinos levaram 786 s (o denso 81 s, cada MoE 62–129 s) e o notebook inteiro
# cerca de 13 min. Numa GPU: não medido ainda. Como script: `uv run -m scripts.03_train_moe`; para
# treinos 3× mais longos, `--steps=900`. Num notebook, edite o dicionário ou defina
# `NANOMOE_ARGS="--steps=900"`. `--quick` roda tudo em segundos (é o que os testes usam).

# %%
DEFAULTS = dict(
    quick=False,
    corpus="machado",
    source="",  # a local copy of the corpus (a folder of .txt files) when offline
    n_layer=4,
    n_head=4,
    n_embd=128,
    block_size=128,
    batch_size=16,
    steps=300,  # optimizer steps per run (same token budget for every run)
    lr=2e-3,
    min_lr=2e-4,
    warmup_steps=30,
    eval_interval=25,
    eval_iters=10,
    n_experts=8,
    aux_coefs="0,0.001,0.01,0.1",  # balance-loss sweep (top-2); 0.01 is also the main MoE run
    main_aux=0.01,  # balance-loss coefficient of the dense-vs-MoE comparison
    z_coef=0.001,
    capacity_factor=1.0,  # the capacity run; 0 = skip it
    bias_rate=0.001,  # DeepSeek-V3 bias run (no aux loss); 0 = skip it
    load_every=10,  # steps per window of the expert-load heatmap
    seed=1337,
    device="auto",
    out_dir="runs/03",
    threads=0,  # torch CPU threads; 0 = torch's default (all cores)
)
QUICK = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, steps=6, warmup_steps=2, eval_interval=3,
             eval_iters=2, n_experts=4, aux_coefs="0,0.01", load_every=2, threads=1)
args = parse_args(DEFAULTS, quick=QUICK)
out_dir = Path(args.out_dir)
out_dir.mkdir(parents=True, exist_ok=True)
if args.threads > 0:
    torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
print(args)

# %% [markdown]
# ## 1. O roteador: softmax, top-k e os pesos das portas
#
# Para um token $x \in \mathbb{R}^C$ o roteador é uma camada linear **sem viés**
# $W_r \in \mathbb{R}^{E\times C}$ (calculada em float32 mesmo com precisão mista: os logits
# passam por exponenciais e por um top-k, onde o arredondamento do bfloat16 troca especialistas):
#
# $$ \ell = W_r\,x, \qquad p = \text{softmax}(\ell), \qquad S = \text{top-}k(p) $$
#
# $$ g_i = \frac{p_i}{\sum_{j \in S} p_j}\ (i \in S) \qquad
#    y = \sum_{i \in S} g_i\, E_i(x) $$
#
# A renormalização sobre os $k$ escolhidos é a do Mixtral (`moe_renormalize=True`). Com $k = 1$
# ela daria $g = p_i/p_i = 1$ — uma constante, e o roteador ficaria sem gradiente da loss do
# modelo; por isso, com $k=1$, usamos $g = p_i$ como o Switch Transformer.
#
# **Por que a porta precisa multiplicar a saída.** O top-k é uma escolha discreta: não tem
# derivada. O único caminho do gradiente da loss até $W_r$ é o fator $g_i$ em $y$. Um MoE que
# escolhe os especialistas pelo roteador mas soma as saídas sem $g_i$ tem um roteador que nunca
# aprende (foi o erro do repositório original).

# %%
show_source(MoE.route)

# %%
toy = moe_config(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16, n_experts=4, moe_top_k=2)
torch.manual_seed(0)
moe = MoE(toy)
x = torch.randn(1, 3, 16)  # 3 tokens
logits, probs, topk_idx, gates = moe.route(x)
for t in range(3):
    print(f"token {t}: p = {[round(v, 3) for v in probs[0, t].tolist()]}  top-2 = {topk_idx[0, t].tolist()}  "
          f"g = {[round(v, 3) for v in gates[0, t].tolist()]}  (soma {gates[0, t].sum():.3f})")

# %% [markdown]
# Em figura: os 3 tokens, os especialistas que o roteador escolheu para cada um, e a volta: a saída de
# cada especialista multiplicada pela porta $g$ e **somada** na saída do token.

# %%
fig = plot_moe_dispatch(topk_idx[0], gates[0], toy.n_experts, token_labels=["x0", "x1", "x2"],
                        save_path=out_dir / "moe_dispatch.png")

# %% [markdown]
# **Construa você mesmo: uma camada MoE em dez linhas.** O roteador (softmax dos logits), o top-k, as
# portas (renormalizadas com $k > 1$, a probabilidade crua com $k = 1$) e a **soma** ponderada dos
# $k$ especialistas — não a saída do último. Para a conferência, cada especialista do pacote vira um
# MLP denso comum (`expert_as_mlp`), e comparamos com a camada `MoE` inteira, com top-2 e top-1.

# %%
def my_moe(x: torch.Tensor, w_router: torch.Tensor, experts: list, k: int):
    """x (T, C); w_router (E, C); experts: E modules (C,) -> (C,). Returns y (T, C), p (T, E), top_i (T, k)."""
    p = (x @ w_router.T).softmax(-1)  # (T, E) the full softmax over the experts
    top_p, top_i = p.topk(k, dim=-1)  # (T, k) the k most probable experts of each token
    g = top_p / top_p.sum(-1, keepdim=True) if k > 1 else top_p  # gates: Mixtral renormalizes; Switch keeps p
    y = torch.zeros_like(x)
    for t in range(x.size(0)):
        for j in range(k):
            y[t] = y[t] + g[t, j] * experts[top_i[t, j]](x[t])  # SUM the k experts, each times its gate
    return y, p, top_i


def expert_as_mlp(moe: MoE, e: int) -> MLP:
    """Expert e of a MoE layer as an ordinary dense MLP (the stacked weights, transposed)."""
    mlp = MLP(moe.experts.n_embd, moe.experts.hidden, moe.kind, bias=False)
    with torch.no_grad():
        mlp.c_fc.weight.copy_(moe.experts.c_fc[e].T)
        mlp.c_proj.weight.copy_(moe.experts.c_proj[e].T)
    return mlp


# %%
for k in (2, 1):
    torch.manual_seed(0)
    layer = MoE(toy.replace(moe_top_k=k))
    with torch.no_grad():
        y_mine, _, i_mine = my_moe(x[0], layer.router.weight, [expert_as_mlp(layer, e) for e in range(4)], k)
        y_pkg, _, st = layer(x)
    torch.testing.assert_close(y_mine, y_pkg[0])
    assert torch.equal(i_mine, st["topk_idx"][0])
    print(f"top-{k}: my_moe == nanomoe.moe.MoE (mesmos especialistas escolhidos, mesma saída)")

# %% [markdown]
# E o gradiente: com as losses auxiliares **desligadas**, só a entropia cruzada chega ao roteador —
# pelas portas. Se somássemos as saídas sem as portas, o gradiente do roteador seria nulo:

# %%
small_lm = moe_config(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, n_experts=4,
                      moe_aux_loss_coef=0.0, moe_z_loss_coef=0.0)
for k in (2, 1):
    torch.manual_seed(0)
    lm = GPT(small_lm.replace(moe_top_k=k))
    idx = torch.randint(0, 32, (2, 16))
    _, loss = lm(idx, idx)
    loss.backward()
    norms = [f"{float(m.router.weight.grad.norm()):.2e}" for m in moe_layers(lm)]
    print(f"top-{k}: ||grad W_r|| por camada (só entropia cruzada) = {norms}")

moe.zero_grad()
_, _, idx, _ = moe.route(x)
no_gate = sum(expert_mlp(x[0], moe.experts.c_fc[e], moe.experts.c_proj[e], moe.kind)
              * (idx[0] == e).any(-1, keepdim=True) for e in range(4))  # the chosen experts, summed without g
no_gate.square().sum().backward()
print("sem portas: grad W_r =", moe.router.weight.grad, "(o roteador nem entra no grafo do gradiente)")

# %% [markdown]
# ## 2. Os especialistas, empilhados, e a comparação justa
#
# Cada especialista é um MLP SwiGLU (o mesmo tipo do modelo denso do capítulo 02). Guardamos os
# $E$ especialistas como **dois tensores 3-D**: `c_fc` $(E, C, 2H)$ e `c_proj` $(E, H, C)$, com
# $y = x\,W$. Uma `ModuleList` de MLPs parece mais natural, mas quebra o treino distribuído
# (DDP): um especialista que não recebeu nenhum token no lote fica sem gradiente, o DDP espera por
# ele e, por padrão, o passo seguinte para com o erro *"Expected to have finished reduction in the
# prior iteration before starting a new one"*. A saída usual é `find_unused_parameters=True`, que
# custa uma varredura extra do grafo a cada passo. Empilhados, ele recebe um gradiente **zero** (teste
# `test_ddp_with_an_expert_that_gets_no_tokens`).
#
# **Parâmetros ativos iguais.** Se cada especialista fosse tão largo quanto o MLP denso, o top-2
# dobraria as contas por token e "o MoE ganhou" não diria nada. Por padrão
# `expert_hidden_dim = hidden_dim // (k + n_shared_experts)`: os $k$ especialistas de um token
# somam a largura do MLP denso. O modelo tem $E/k$ vezes mais pesos de MLP, mas cada token usa
# a mesma quantidade.

# %%
show_source(Experts)
print(inspect.getsource(type(toy).expert_hidden_dim.fget))

# %%
for k in (1, 2):
    cfg = moe_config(n_embd=args.n_embd, n_head=args.n_head, n_experts=8, moe_top_k=k)
    layer, dense = MoE(cfg), MLP(cfg.n_embd, cfg.hidden_dim, "swiglu", bias=False)
    per_expert = sum(p.numel() for p in layer.experts.parameters()) // cfg.n_experts
    print(f"top-{k}: MLP denso H={cfg.hidden_dim}: {sum(p.numel() for p in dense.parameters()):,} pesos | "
          f"especialista H={cfg.expert_hidden_dim}: {per_expert:,} pesos x 8 = {8 * per_expert:,} no total, "
          f"{k * per_expert:,} ativos por token (+ roteador {layer.router.weight.numel():,})")

# %% [markdown]
# ## 3. A loss de balanceamento (Switch Transformer)
#
# Sem incentivo, o roteador tende ao colapso: os especialistas que recebem mais tokens aprendem
# mais rápido, ficam melhores e recebem ainda mais tokens. O Switch Transformer (eq. 4) soma à
# loss
#
# $$ \mathcal{L}_{bal} = N \sum_{i=1}^{N} f_i\, P_i, \qquad
#    f_i = \frac{\#\{\text{atribuições ao especialista } i\}}{T\cdot k}, \qquad
#    P_i = \frac{1}{T}\sum_{x} p_i(x) $$
#
# com $N = E$ especialistas e $T$ tokens. $f_i$ é a fração das $T\cdot k$ **atribuições** que
# foram para $i$ (soma 1 para qualquer $k$); $f$ vem de um top-k e não tem gradiente, o
# gradiente passa por $P_i$, a probabilidade média do softmax **completo** (não dos $k$
# renormalizados: esses somam 1 entre os escolhidos e não dizem nada dos outros).
# Com carga equilibrada $f_i = 1/N$ e $\mathcal{L}_{bal} = \sum_i P_i = 1$; com roteador uniforme
# $P_i = 1/N$ e de novo $\mathcal{L}_{bal} = 1$; com top-1, se tudo vai para um especialista,
# $f = P = (1, 0, \dots)$ e $\mathcal{L}_{bal} = N$. Com top-$k$ um especialista recebe no máximo
# $1/k$ das atribuições (cada token escolhe $k$ especialistas **distintos**), então o colapso total
# — os mesmos $k$ especialistas para todo token — dá $\mathcal{L}_{bal} = N/k$. Dois erros comuns:
# tirar a média em vez de multiplicar por $N$ (a média sobre os $N$ especialistas dá $1/N^2$ do
# valor, e o coeficiente perde o sentido) e normalizar $f$ para somar $k$ (o valor passa a depender
# de $k$).
#
# ## 4. A *router z-loss* (ST-MoE)
#
# Logits do roteador que crescem sem limite tornam o softmax instável (exponenciais enormes,
# arredondamento em bfloat16). O ST-MoE (eq. 5) penaliza o log-sum-exp dos logits:
#
# $$ \mathcal{L}_z = \frac{1}{T}\sum_x \Big(\log \sum_{i=1}^{N} e^{\ell_i(x)}\Big)^2 $$
#
# A loss total é $\mathcal{L} = \text{CE} + \alpha\,\mathcal{L}_{bal} + \beta\,\mathcal{L}_z$
# (`moe_aux_loss_coef` $=\alpha$, `moe_z_loss_coef` $=\beta$). O modelo devolve essa soma como
# `loss` (é o que o treino otimiza), e a entropia cruzada sozinha em `out.ce_loss` (a saída do
# forward também traz `aux_loss` e `moe_stats`): validação e perplexidade usam só ela, nunca
# CE + losses auxiliares.

# %%
show_source(MoE.forward)

# %%
E, T = 4, 16


def balanced(w):  # token t prefers expert t % 4 (logit 1 + t % 4), then (t + 1) % 4 (logit 0.5)
    w.zero_()
    w[:, :E] = torch.eye(E)


def uniform(w):  # every probability 1/4
    w.zero_()


def collapsed(w):  # logit 100 for expert 0
    w.zero_()
    w[0, E] = 100.0


xs = torch.zeros(1, T, 16)
for t in range(T):
    xs[0, t, t % E] = 1.0 + t % E
    xs[0, t, (t + 1) % E] = 0.5
xs[0, :, E] = 1.0
for name, set_router in [("carga equilibrada", balanced), ("roteador uniforme", uniform),
                         ("colapso no especialista 0", collapsed)]:
    for k in (1, 2):
        m = MoE(toy.replace(moe_top_k=k))
        with torch.no_grad():
            set_router(m.router.weight)
            _, _, st = m(xs)
        print(f"{name:26s} k={k}: carga={[int(v) for v in st['load'].tolist()]}  "
              f"P={[round(v, 2) for v in st['importance'].tolist()]}  L_bal={st['balance_loss']:.4f}  "
              f"L_z={st['z_loss']:.1f}")

# %% [markdown]
# Com o roteador uniforme, $P_i = 1/N$ e $\mathcal{L}_{bal} = 1$ qualquer que seja a carga (aqui os
# empates do top-k mandam tudo para os mesmos especialistas): é o ponto de partida de um roteador
# recém-inicializado. Com $k=2$ o colapso máximo é em dois especialistas, $\mathcal{L}_{bal} = N/2$
# (aqui $4/2 = 2$): o máximo é $N/k$, não $N$. E a z-loss explode com o logit 100 do colapso
# ($100^2$): é exatamente o crescimento que ela pune.
#
# **Construa você mesmo: a loss de balanceamento em quatro linhas.** $f$ conta as atribuições
# (`bincount`, sem gradiente), $P$ é a média do softmax completo. A conferência compara o valor **e o
# gradiente** em $W_r$ com os da camada `MoE` (com $\alpha = 1$ e sem z-loss, a loss auxiliar que ela
# devolve é exatamente $\mathcal{L}_{bal}$), em 64 tokens aleatórios.

# %%
def my_balance_loss(p: torch.Tensor, top_i: torch.Tensor, n_experts: int) -> torch.Tensor:
    """p (T, E) full softmax; top_i (T, k) chosen experts. Switch Transformer, eq. 4."""
    f = torch.bincount(top_i.flatten(), minlength=n_experts).float() / top_i.numel()  # share of the T*k assignments
    P = p.mean(0)  # mean probability per expert: the only part with a gradient
    return n_experts * (f * P).sum()


# %%
torch.manual_seed(0)
layer = MoE(toy.replace(moe_aux_loss_coef=1.0, moe_z_loss_coef=0.0))
x64 = torch.randn(1, 64, 16)
_, aux, _ = layer(x64)
p = (x64[0] @ layer.router.weight.T).softmax(-1)
mine = my_balance_loss(p, p.topk(2, dim=-1).indices, 4)
torch.testing.assert_close(mine, aux)
grad_mine, grad_pkg = (torch.autograd.grad(v, layer.router.weight)[0] for v in (mine, aux))
torch.testing.assert_close(grad_mine, grad_pkg)
print(f"my_balance_loss == MoE (valor {mine.item():.4f} e gradiente em W_r)")

# %% [markdown]
# ## 5. Capacidade: descartar tokens, sem espiar o futuro
#
# Em hardware com formas fixas (TPU, o Switch original) cada especialista processa no máximo
#
# $$ \text{capacidade} = \max\!\Big(c_{min},\ \Big\lceil \text{cf}\cdot\frac{T\,k}{N}\Big\rceil\Big) $$
#
# tokens; o que passa disso é **descartado**: a atribuição contribui zero e o token segue só pela
# conexão residual (nunca por uma camada aprendida). Três detalhes fazem diferença:
#
# 1. **Mínimo.** Um prompt de 1 token com $N=8$, $k=2$, cf $=1$ pede $\text{cf}\cdot Tk/N = 0{,}25$
#    vaga por especialista. Com o teto da fórmula isso vira 1; mas uma implementação que trunca
#    com `int()` (como o repositório original) chega a $\lfloor 0{,}25\rfloor = 0$ e descarta o
#    token inteiro na geração. O mínimo $c_{min}$ (padrão 4) garante vagas em qualquer caso.
# 2. **Por sequência e em ordem de posição.** Calculamos a capacidade para cada sequência
#    ($T$ = seu tamanho) e os tokens ocupam as vagas na ordem em que aparecem. Se a disputa fosse
#    no lote inteiro, ou ordenada pela confiança do roteador, a saída de um token dependeria dos
#    tokens **seguintes** — um vazamento de causalidade no treino (o modelo "vê" o futuro). O preço:
#    o Switch e o GShard contam a capacidade no lote de cada dispositivo (milhares de tokens), onde
#    as flutuações da carga se compensam; numa sequência de 128 tokens elas pesam muito mais, e o
#    mesmo fator descarta mais (capítulo 07, exercício 3).
# 3. **Sem descarte é o padrão** (*dropless*: `moe_capacity_factor=None`, como o Mixtral): com capacidade, um
#    passo de decodificação com cache vê 1 token e nunca descarta, enquanto a passagem pela
#    sequência inteira pode descartar — sem capacidade as duas coincidem.

# %%
show_source(capacity, capacity_keep)

# %%
route = [0, 0, 0, 1, 1, 2, 0, 3]  # the top-1 expert of 8 tokens, crafted
m = MoE(toy.replace(moe_top_k=1, moe_capacity_factor=1.0, moe_min_capacity=1))
with torch.no_grad():
    m.router.weight.zero_()
    m.router.weight[:, :4] = 10 * torch.eye(4)
xs = torch.zeros(1, 8, 16)
for t, e in enumerate(route):
    xs[0, t, e] = 1.0
xs[0, :, 4:] = torch.randn(8, 12)
y, _, st = m(xs)
print("capacidade por especialista:", capacity(8, 4, 1, 1.0, 1))
print("especialista de cada token: ", st["topk_idx"][0, :, 0].tolist())
print("token descartado (y == 0):  ", (y[0].abs().sum(-1) == 0).tolist(), "-> descartes:", int(st["dropped"]))
print("1 token, cf=1, N=8, k=2: capacidade =", capacity(1, 8, 2, 1.0, 1), "com mínimo 1,", capacity(1, 8, 2, 1.0, 4),
      "com o mínimo padrão 4; int(cf * T * k / N) daria", int(1.0 * 1 * 2 / 8))

# %% [markdown]
# ## 6. Balanceamento sem loss auxiliar (DeepSeek-V3)
#
# A loss de balanceamento briga com a entropia cruzada: um $\alpha$ grande equilibra a carga mas
# piora o modelo. O DeepSeek-V3 soma um **viés** $b_i$ às afinidades *só para escolher* os
# especialistas; as portas continuam vindo das afinidades sem viés. No DeepSeek-V3 as afinidades
# são sigmoides, $s_i = \sigma(\ell_i)$ (a seção 2.1.2 do artigo); aqui, com o roteador softmax
# padrão, aplicamos o mesmo viés às probabilidades $p_i$ — uma adaptação nossa, não a receita do
# artigo (o roteador sigmoide é `moe_router="sigmoid"`):
#
# $$ S = \text{top-}k(p_i + b_i), \qquad g_i = \frac{p_i}{\sum_{j\in S} p_j} $$
#
# Depois de cada passo do otimizador, $b_i \leftarrow b_i + \gamma\,\text{sign}(\bar c - c_i)$,
# onde $c_i$ é a carga do especialista $i$ no passo e $\bar c$ a média: especialistas
# sobrecarregados ficam menos atraentes. Ligue com `moe_bias_balance=True`; o laço de treino
# (`nanomoe.training.train.train`) chama `update_moe_bias(model, loads)` depois de cada `optimizer.step()`
# (somando as cargas de todos os micro-lotes e, com DDP, de todos os processos).

# %%
show_source(update_moe_bias)

# %%
m = MoE(toy.replace(moe_bias_balance=True))
xs = torch.randn(1, 6, 16)
_, p0, idx0, g0 = m.route(xs)
with torch.no_grad():
    m.expert_bias[3] = 1.0  # make expert 3 attractive
_, p1, idx1, g1 = m.route(xs)
print("escolhidos sem viés:", idx0[0].tolist())
print("escolhidos com viés:", idx1[0].tolist())
print("probabilidades iguais:", torch.equal(p0, p1), "| portas = p renormalizado sem viés:",
      torch.allclose(g1, p1.gather(-1, idx1) / p1.gather(-1, idx1).sum(-1, keepdim=True)))

# %% [markdown]
# ## 7. Duas implementações: a de referência e a rápida
#
# `moe_impl="reference"` percorre os especialistas: cada um junta seus tokens (`index_select`),
# calcula, multiplica pela porta e **soma** de volta (`index_add_`). É fácil de ler, e é o que
# usamos para conferir a outra.
#
# `moe_impl="fast"` (padrão) ordena as $T\cdot k$ atribuições por especialista, de modo que os
# tokens de cada especialista fiquem contíguos, e roda os especialistas com um de três kernels
# (`pick_kernel` escolhe):
#
# - `grouped`: **uma** multiplicação agrupada por matriz (`torch.nn.functional.grouped_mm`, o
#   kernel de MoE do PyTorch; numa GPU Ampere ou mais nova, em bf16, é um kernel fundido, e o
#   `torch.compile` gera um grafo sem quebras). Numa T4 (fp16, sm75), `pick_kernel` escolhe o
#   `padded` abaixo (escolha não medida ainda: o curso ainda não tem medidas em GPU);
# - `loop`: uma multiplicação por especialista sobre `W.unbind(0)`. Um detalhe medido: indexar
#   `W[e]` dentro do laço faz o backward de cada `W[e]` escrever um tensor de zeros do tamanho de
#   `W` inteiro; `unbind` não;
# - `padded`: completa com zeros os tokens de cada especialista até o tamanho do maior e faz duas
#   `bmm` — poucos kernels grandes, pagando as contas do enchimento.
#
# Com capacidade, as atribuições descartadas vão para o fim da ordem (depois de todos os
# especialistas) e ficam fora dos grupos do kernel, sem ler nada de volta na CPU. A ordenação é
# `sort_by_expert`; o `LocalDispatcher` despacha (`dispatch`) e combina (`combine`), e o `MoE.forward`
# lê rotear → despachar → especialistas → combinar.

# %%
show_source(MoE._dispatch_reference, sort_by_expert, LocalDispatcher, experts_grouped, experts_loop, experts_padded,
            pick_kernel)

# %%
cfg = moe_config(vocab_size=16, block_size=64, n_layer=1, n_head=2, n_embd=64, n_experts=8, moe_top_k=2)
for cf in (None, 1.0):
    torch.manual_seed(0)
    m = MoE(cfg.replace(moe_capacity_factor=cf))
    xs = torch.randn(4, 64, 64, requires_grad=True)
    res = {}
    for impl, kernel in (("reference", None), ("fast", "grouped"), ("fast", "loop"), ("fast", "padded")):
        m.impl, m.kernel = impl, kernel
        m.zero_grad()
        xs.grad = None
        y, aux, st = m(xs)
        (y.square().sum() + aux).backward()
        res[kernel] = (y.detach(), xs.grad.clone(), m.experts.c_fc.grad.clone(), m.router.weight.grad.clone())
    for kernel in ("grouped", "loop", "padded"):
        diffs = [float((a - b).abs().max()) for a, b in zip(res[None], res[kernel])]
        print(f"capacidade={cf}, fast/{kernel:7s}: max |ref - fast| em y, dL/dx, dL/dW_fc, dL/dW_r = "
              f"{[f'{d:.1e}' for d in diffs]}")

# %% [markdown]
# O benchmark `uv run -m scripts.bench_03_moe` mede lado a lado o tempo de forward+backward de
# uma camada MoE (8 especialistas, top-2, mesmos parâmetros ativos) contra o MLP denso. Numa
# CPU x86_64 de 2 núcleos (AMD EPYC, PyTorch 2.15, float32; 4096 tokens): `grouped` custa
# 1,04–1,10× o MLP denso, o laço 1,01–1,07×, o `padded` 1,16–1,27× e a referência 1,09–1,13×
# (detalhes em `docs/benchmarks.md`). Numa máquina compartilhada, rode com
# `OMP_WAIT_POLICY=PASSIVE`: com as threads do OpenMP girando à espera umas das outras, o MoE (51
# multiplicações de matrizes no forward + backward contra 6 do MLP denso: uma por especialista)
# chega a custar 1,5–6×.
#
# ## 8. Métricas de roteamento
#
# A saída de cada forward traz `out.moe_stats`, um dicionário por camada MoE (tensores
# desligados do grafo). `MoEMetrics` acumula essas estatísticas numa janela e resume:
# fração da carga por especialista, coeficiente de variação (CV) da carga, carga máxima / média
# (o fator de capacidade que teria evitado todo descarte), especialistas mortos, fração
# descartada, entropia normalizada do roteador, probabilidade média do top-1 e as losses
# $\mathcal{L}_{bal}$ e $\mathcal{L}_z$ antes dos coeficientes.

# %%
show_source(MoEMetrics.summary)

# %% [markdown]
# ## 9. O experimento: denso contra MoE no Machado de Assis
#
# Corpus: as obras de Machado de Assis, tokenizador de caracteres, 90% para treino e os 10%
# finais para validação. Todos os treinos usam a mesma semente (os mesmos lotes, na mesma ordem),
# o mesmo número de passos e de tokens, e a mesma receita (AdamW, *warmup* + cosseno).
#
# 1. **denso**: o modelo moderno de `modern_config` com 4 cabeças, que tem **1** cabeça de k/v
#    (MQA; 721 792 parâmetros). Atenção: a ablação do capítulo 02 terminou com 2 cabeças de k/v
#    (GQA-2, 754 560 parâmetros, validação 1,9882). Com 1 cabeça de k/v e tudo o mais igual, a
#    mesma receita do capítulo 02 chega a 2,010 (medimos; ver o exercício 1 do capítulo 02), o
#    denso daqui; a diferença de ~0,02 nat para o capítulo 02 vem da cabeça de k/v a menos, numa
#    semente só (a loss do denso varia ~0,04 entre sementes, seção 10);
# 2. **MoE top-2** e **MoE top-1**: 8 especialistas em todas as camadas, com os mesmos
#    parâmetros ativos do denso ($\alpha = 0{,}01$, $\beta = 0{,}001$);
# 3. **varredura de $\alpha$** (top-2): 0; 0,001; 0,01; 0,1 — efeito na carga e na validação;
# 4. **capacidade** (top-2, cf $=1$): quanto se descarta e quanto custa;
# 5. **viés DeepSeek-V3** (top-2, $\alpha = 0$): balanceamento sem loss auxiliar.

# %%
text = read_corpus(args.corpus, source=args.source or None)
if args.quick:
    text = text[:200_000]
tok = get_tokenizer("char", text=text)
train_ids, val_ids = encode_splits(tok, text)  # first 90% of the characters / last 10%
print(f"{len(text):,} caracteres, vocabulário de {tok.vocab_size} símbolos; "
      f"{len(train_ids):,} tokens de treino, {len(val_ids):,} de validação")

# %%
shape = dict(vocab_size=tok.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
             n_embd=args.n_embd, dropout=0.0)
moe_shape = dict(shape, n_experts=args.n_experts, moe_z_loss_coef=args.z_coef)
aux_coefs = [float(c) for c in str(args.aux_coefs).split(",")]
runs = {"denso": modern_config(**shape)}
runs["MoE top-2"] = moe_config(**moe_shape, moe_top_k=2, moe_aux_loss_coef=args.main_aux)
runs["MoE top-1"] = moe_config(**moe_shape, moe_top_k=1, moe_aux_loss_coef=args.main_aux)
for c in aux_coefs:
    if c != args.main_aux:
        runs[f"MoE top-2 α={c:g}"] = moe_config(**moe_shape, moe_top_k=2, moe_aux_loss_coef=c)
if args.capacity_factor > 0:
    runs[f"MoE top-2 cf={args.capacity_factor:g}"] = moe_config(
        **moe_shape, moe_top_k=2, moe_aux_loss_coef=args.main_aux, moe_capacity_factor=args.capacity_factor)
if args.bias_rate > 0:
    runs["MoE top-2 viés (α=0)"] = moe_config(**moe_shape, moe_top_k=2, moe_aux_loss_coef=0.0, moe_bias_balance=True,
                                                moe_bias_update_rate=args.bias_rate)

tcfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                   warmup_steps=args.warmup_steps, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
                   weight_decay=0.1, grad_clip=1.0, seed=args.seed, device=args.device, sample_tokens=0)
print(f"{len(runs)} treinos x {tcfg.max_steps * tcfg.batch_size * args.block_size:,} tokens de treino cada")


# %%
def run_one(name: str, cfg) -> dict:
    """Train one configuration; collect the routing metrics over windows of `load_every` steps."""
    torch.manual_seed(args.seed)  # same initialization stream for every run
    model = GPT(cfg)
    window, loads, load_steps, summaries = MoEMetrics(), [], [], []

    def on_step(step: int, model, st) -> None:
        window.update(st.moe_stats)
        if window.steps and (step % args.load_every == 0 or step == args.steps):
            loads.append(window.load_fractions().numpy())
            load_steps.append(step)
            summaries.append(window.summary())
            window.reset()

    res = train(model, train_ids, val_ids, tcfg, on_step=on_step if cfg.n_experts else None,
                progress=not args.quick)
    last = summaries[-1] if summaries else {}
    return dict(
        model=model.cpu().eval(), history=res.history, loads=loads, load_steps=load_steps,
        active=model.num_params(active=True), total=model.num_params(),
        val_loss=res.final.get("val_loss"), train_loss=res.final.get("train_loss"),
        tokens_per_s=res.tokens_per_s, seconds=res.train_time_s,
        load_cv=last.get("load_cv"), max_over_mean=last.get("max_over_mean"), dead=last.get("dead"),
        dropped=last.get("dropped_frac"), entropy=last.get("entropy"), top1=last.get("top1_prob"),
        balance=last.get("balance_loss"), z=last.get("z_loss"),
    )


results = {}
t_all = time.perf_counter()
for name, cfg in runs.items():
    print(f"\n=== {name} ===")
    results[name] = run_one(name, cfg)
total_s = time.perf_counter() - t_all
print(f"\n{len(runs)} treinos em {total_s:.0f} s")


# %%
def fmt(v, spec):
    return "—" if v is None else format(v, spec)


rows = ["| treino | params ativos | params totais | loss validação | CV carga | max/média | mortos | descartados | "
        "L_bal | tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for name, r in results.items():
    rows.append(f"| {name} | {r['active']:,} | {r['total']:,} | {fmt(r['val_loss'], '.4f')} | "
                f"{fmt(r['load_cv'], '.3f')} | "
                f"{fmt(r['max_over_mean'], '.2f')} | {fmt(r['dead'], 'd')} | "
                f"{fmt(None if r['dropped'] is None else 100 * r['dropped'], '.1f')}"
                f"{'' if r['dropped'] is None else '%'} | "
                f"{fmt(r['balance'], '.3f')} | {r['tokens_per_s']:,.0f} |")
table = "\n".join(rows)
print(table)
(out_dir / "results.md").write_text(table + "\n", encoding="utf-8")
print("\n(métricas de roteamento: média das camadas na última janela de", args.load_every, "passos)")

# %% [markdown]
# ### Curvas de validação: denso contra MoE (mesmos parâmetros ativos, mesmos tokens)

# %%
main_runs = [n for n in ("denso", "MoE top-2", "MoE top-1") if n in results]
fig = plot_curves({n: results[n]["history"] for n in main_runs}, x="tokens", y="val_loss",
                  title="Machado de Assis: denso vs MoE (validação)", figsize=(8, 4.5))
save_figure(fig, out_dir / "val_dense_vs_moe.png")

# %% [markdown]
# ### A carga dos especialistas ao longo do treino (MoE top-2, α = 0,01)
#
# Cada painel é uma camada MoE; cada linha, um especialista; a cor, a fração das atribuições da
# janela que ele recebeu (branco = $1/8$, equilíbrio perfeito; vermelho = sobrecarga; azul = fome).

# %%
r = results["MoE top-2"]
fig = plot_expert_load(r["loads"], r["load_steps"], title="MoE top-2, α = 0.01: carga por especialista")
save_figure(fig, out_dir / "expert_load_top2.png")

# %%
no_aux = f"MoE top-2 α={0:g}"
if no_aux in results:
    r = results[no_aux]
    fig = plot_expert_load(r["loads"], r["load_steps"], title="MoE top-2, α = 0 (sem loss de balanceamento)")
    save_figure(fig, out_dir / "expert_load_top2_alpha0.png")

# %% [markdown]
# ### A varredura do coeficiente de balanceamento

# %%
sweep = {c: results["MoE top-2" if c == args.main_aux else f"MoE top-2 α={c:g}"] for c in sorted(aux_coefs)}
fig = plot_balance_sweep(list(sweep), [s["load_cv"] for s in sweep.values()], [s["val_loss"] for s in sweep.values()],
                         title="Loss de balanceamento: carga vs qualidade (MoE top-2)")
save_figure(fig, out_dir / "balance_sweep.png")

# %% [markdown]
# ### Para qual especialista vai cada caractere?
#
# Uma frase de *Dom Casmurro* passa pelo MoE top-2 treinado; cada célula mostra o especialista
# top-1 do caractere em cada camada.

# %%
sentence = "Olhos de cigana oblíqua e dissimulada." if not args.quick else text[:24]
model = results["MoE top-2"]["model"]
ids = torch.tensor([tok.encode(sentence)])
with torch.no_grad():
    out = model(ids)
experts = [st["topk_idx"][0, :, 0].tolist() for st in out.moe_stats]  # (layers, T)
fig = plot_token_routing(list(sentence), experts, model.config.n_experts)
save_figure(fig, out_dir / "token_routing.png")

# %% [markdown]
# E em muitos caracteres de validação: para cada especialista da última camada, os caracteres que
# ele mais recebe (em proporção das ocorrências do caractere). Especialização aparece como
# grupos — espaços, pontuação e acentos, vogais, consoantes (a saída abaixo).

# %%
n_chars = 4096 if not args.quick else 256
chunk = torch.tensor(val_ids[: n_chars], dtype=torch.long).view(-1, min(args.block_size, n_chars))
with torch.no_grad():
    out = model(chunk)
top1 = out.moe_stats[-1]["topk_idx"][..., 0].flatten().tolist()
chars = [tok.decode([i]) for i in chunk.flatten().tolist()]
per_char = Counter(chars)
pairs = Counter(zip(top1, chars))
for e in range(model.config.n_experts):
    share = sorted(((n / per_char[c], c) for (ee, c), n in pairs.items() if ee == e and per_char[c] >= 10),
                   reverse=True)
    shown = " ".join(f"{({' ': '␣', chr(10): '⏎'}).get(c, c)}:{s:.0%}" for s, c in share[:8])
    print(f"E{e}: {sum(n for (ee, _), n in pairs.items() if ee == e) / len(chars):5.1%} dos tokens | {shown}")

# %% [markdown]
# ## 10. Resultados
#
# Execução de referência: este notebook, de cima a baixo, com os parâmetros padrão (4 camadas,
# C = 128, 4 cabeças, contexto 128; 300 passos × 16 × 128 = 614 mil tokens de treino por
# configuração; semente 1337), nanomoe 0.3.0 e PyTorch 2.15 numa CPU x86_64 de 2 núcleos
# compartilhada com outros processos, threads padrão do PyTorch: cerca de 13 min de relógio, 786 s
# para os 8 treinos. As métricas de roteamento são a média das 4 camadas na última janela de 10
# passos; omitimos os tokens/s, que numa CPU compartilhada medem sobretudo a carga da máquina (a
# velocidade da camada está no benchmark).
#
# | treino | params ativos | params totais | loss validação | CV carga | max/média | mortos | descartados | L_bal |
# |---|---:|---:|---:|---:|---:|---:|---:|---:|
# | denso | 721 792 | 721 792 | 2,0099 | — | — | — | — | — |
# | MoE top-2 | 725 888 | 2 347 904 | 2,0267 | 0,145 | 1,24 | 0 | 0,0% | 1,009 |
# | MoE top-1 | 725 888 | 4 510 592 | 2,1006 | 0,202 | 1,33 | 0 | 0,0% | 1,011 |
# | MoE top-2 α=0 | 725 888 | 2 347 904 | 2,0375 | 1,333 | 3,58 | 6 | 0,0% | 2,483 |
# | MoE top-2 α=0.001 | 725 888 | 2 347 904 | 2,0217 | 0,489 | 1,84 | 0 | 0,0% | 1,092 |
# | MoE top-2 α=0.1 | 725 888 | 2 347 904 | 2,0124 | 0,044 | 1,07 | 0 | 0,0% | 1,001 |
# | MoE top-2 cf=1 | 725 888 | 2 347 904 | 2,0875 | 0,063 | 1,10 | 0 | 6,3% | 1,001 |
# | MoE top-2 viés (α=0) | 725 888 | 2 347 904 | 1,9833 | 0,291 | 1,71 | 1 | 0,0% | 2,117 |
#
# **Denso contra MoE: no orçamento padrão, uma semente não decide.** Com 614 mil tokens o MoE top-2
# ficou 0,017 nat acima do denso nesta execução. A execução anterior deste notebook (nanomoe 0.2.1,
# 1 thread), com os mesmos modelos, a mesma receita e a mesma semente, tinha dado o contrário: o
# top-2 0,011 nat abaixo do denso. Uma versão nova e outro número de threads mudam os
# arredondamentos, e a trajetória do MoE muda tanto quanto com outra semente. Com a versão 0.2.1
# repetimos denso, top-2 e top-1 com outras sementes (`--seed=1`, `--seed=2`) e com 3× mais tokens
# (`--steps=900 --eval_interval=50 --load_every=30`, 1,84 milhão de tokens por treino):
#
# | passos (tokens) | semente | versão | denso | MoE top-2 | MoE top-1 | MoE top-2 viés (α=0) |
# |---|---:|---|---:|---:|---:|---:|
# | 300 (614 mil) | 1337 | 0.3.0 (acima) | **2,0099** | 2,0267 | 2,1006 | 1,9833 |
# | 300 (614 mil) | 1 | 0.2.1 | **1,9765** | 2,0076 | 2,0568 | — |
# | 300 (614 mil) | 2 | 0.2.1 | **1,9722** | 1,9971 | 2,1369 | — |
# | 900 (1,84 milhão) | 1337 | 0.2.1 | 1,6674 | **1,6260** | 1,7265 | 1,6494 |
# | 900 (1,84 milhão) | 1 | 0.2.1 | 1,6546 | **1,6409** | 1,7284 | — |
#
# Com 300 passos o denso ganhou nas três sementes (por 0,017, 0,031 e 0,025 nat); com 900 passos o
# MoE top-2 ganhou nas duas sementes medidas (por 0,041 e 0,014 nat; a curva desses treinos longos
# não está no notebook, só a loss final). Uma explicação plausível, que não testamos: cada
# especialista só vê ~1/4 dos tokens (top-2 de 8), então precisa de mais dados para aprender; o MoE
# tem 3,3× mais parâmetros, mas eles só pagariam quando o modelo denso começa a ficar limitado pela
# sua capacidade, não no começo do treino, quando os dois ainda aprendem o básico (letras, sílabas,
# espaços).
#
# **Top-1 perdeu nos cinco pares de treinos**, e varia mais entre sementes (2,057 a 2,137, contra
# 1,997 a 2,027 do top-2): cada especialista é tão largo quanto o MLP denso, mas vê só ~1/8 dos
# tokens, e sua saída é multiplicada por $p_i$, que começa perto de $1/8$ — o MLP contribui pouco no
# início. O Switch Transformer usa top-1 numa escala em que cada especialista recebe centenas de
# milhões de tokens ou mais.
#
# **Varredura de α.** Sem a loss de balanceamento (α = 0) o roteador colapsa: CV 1,33, o
# especialista mais carregado de cada camada com 3,6× a carga média (média das 4 camadas) e 6
# especialistas mortos (nenhuma atribuição na última janela) somando as 4 camadas. No mapa de calor a
# carga se concentra: na camada 2 quase tudo vai para 2 dos 8 especialistas, na camada 1 sobretudo
# para 2; os outros recebem pouco, mas nem todos zero. α = 0,001 já reduz o CV a 0,49; α = 0,01 (o
# valor do Switch) chega a 0,15; α = 0,1 equilibra quase perfeitamente (CV 0,04). Na validação as
# três ficam a 0,015 nat umas das outras (2,0217, 2,0267 e 2,0124), menos que a variação entre
# sementes (~0,03 na tabela acima): numa semente só, a varredura mostra o efeito na carga, não qual
# α treina melhor.
#
# **Capacidade** (cf = 1): 6,3% das atribuições descartadas e +0,06 nat de validação (2,0875 contra
# 2,0267, numa semente) — o descarte vale também na avaliação, e cada descarte tira de um token um
# dos seus dois especialistas. O Mixtral (e o nosso padrão) não descarta nada.
#
# **Viés do DeepSeek-V3** (α = 0): equilibra sem nenhuma loss auxiliar (CV 0,29 em 300 passos;
# 0,008 em 900, com a 0.2.1). A coluna L_bal dessa linha (2,117) conta $f_i$ no top-k **sem** o
# viés: mede o quanto o roteador, por baixo do viés, ainda prefere poucos especialistas; a carga
# real, que o viés corrige, é a do CV. Com 300 passos teve a melhor validação dos 8 treinos (1,9833
# contra 2,0099 do denso e 2,0124 do melhor α), mas por menos de 0,03 nat, dentro da variação entre
# sementes; com 900 (0.2.1) ficou atrás do top-2 com α = 0,01 (1,6494 contra 1,6260), ainda à frente
# do denso (1,6674). Numa semente só, nenhum vencedor claro entre os dois; a vantagem do viés é não
# precisar escolher um coeficiente nem pôr um gradiente estranho à entropia cruzada no roteador.
#
# **Especialização.** Na execução de referência, na última camada do MoE top-2, um especialista
# recebeu 100% dos espaços e quebras de linha; outro, todos os pontos e vírgulas; outro, o "á" e 85%
# dos "é" (e mais da metade dos "a"); outro, o "b", o "p" e o hífen (e 65% dos "q"); outros, grupos
# de consoantes (f, j, v, g, t; z, l, m, s) ou o "i", o "n" e o "u". Ninguém programou isso: o
# roteador aprendeu com o gradiente que chega pelas portas.

# %% [markdown]
# ## 11. Exercícios
#
# Preveja antes de abrir a resposta. As respostas são de treinos reais com o código deste capítulo
# na configuração padrão (4 camadas, C = 128, 8 especialistas, 300 passos, semente 1337, CPU de 2
# núcleos compartilhada): as tabelas da seção 10 (as outras sementes e os 900 passos, da versão
# 0.2.1).
#
# **1. Top-1 ou top-2?** Com os mesmos parâmetros ativos (o especialista do top-1 tem a largura do
# MLP denso; os do top-2, metade), qual ganha, por quanto, e a diferença é estável entre sementes?
# Rode `uv run -m scripts.03_train_moe --seed=1` e compare as linhas `MoE top-1` e `MoE top-2`.
#
# <details><summary>Resposta</summary>
#
# O top-2 ganhou nos cinco pares de treinos, por 0,05 a 0,14 nat: validação 2,0267 / 2,0076 /
# 1,9971 (sementes 1337, 1 e 2) contra 2,1006 / 2,0568 / 2,1369 do top-1; com 900 passos, 1,6260 /
# 1,6409 contra 1,7265 / 1,7284. O top-1 também varia mais entre sementes (0,08 nat de uma ponta à
# outra, contra 0,03 do top-2).
# Cada especialista do top-1 vê só 1/8 dos
# tokens, e a sua saída é multiplicada por $g = p_i$, que começa perto de 1/8: o MLP quase não
# contribui no início. O top-2 renormaliza as portas (somam 1) e cada token combina dois
# especialistas.
#
# Para ir além: com `moe_top_k=8` (todos os especialistas, cada um com 1/8 da largura), a loss de
# balanceamento vale exatamente 1 em qualquer passo — todo especialista recebe $f_i = 1/8$ das
# atribuições, então $N\sum_i f_i P_i = \sum_i P_i = 1$ — e não dá gradiente nenhum ao roteador.
# Isso sai da fórmula; quanto o top-8 faz na validação não medimos: treine e compare.
#
# </details>
#
# **2. Sem a loss de balanceamento.** Com α = 0, quantos dos 8 especialistas você espera que
# continuem recebendo tokens, e o que acontece com a validação?
#
# <details><summary>Resposta</summary>
#
# O roteador colapsa: na última janela, 6 especialistas mortos somando as 4 camadas, o mais
# carregado de cada camada com 3,58× a carga média, CV 1,33 (contra 0,15 com α = 0,01) e
# $\mathcal{L}_{bal}$ = 2,48 (1 seria o equilíbrio; 4 = $N/k$, o colapso total). No mapa de calor, a
# camada 2 manda quase tudo para 2 dos 8 especialistas (nela, o MoE quase virou um MLP denso dividido
# em dois) e a camada 1, sobretudo para 2; os demais recebem pouco, mas só 6 recebem zero. Na
# validação, nesta semente, o efeito é pequeno: 2,0375 contra 2,0267 com α = 0,01 (+0,011 nat,
# dentro da variação entre sementes, ~0,03). O colapso se vê na carga: a capacidade extra que o MoE
# prometia fica parada em especialistas que quase não recebem tokens.
#
# </details>
#
# **3. Capacidade.** Com fator de capacidade 1 (cada especialista aceita, por sequência, a sua parte
# justa $Tk/N$ das atribuições), que fração das atribuições você espera perder num roteador já bem
# balanceado (CV ≈ 0,1)? E quanto isso custa na validação?
#
# <details><summary>Resposta</summary>
#
# 6,3% das atribuições foram descartadas (linha `cf=1` da tabela), com a carga equilibrada (CV
# 0,06). Equilíbrio médio não basta: numa sequência de 128 tokens a carga flutua, e todo
# especialista que passa da sua cota descarta o excedente. O custo foi +0,06 nat de validação (2,0875
# contra 2,0267, numa semente), porque o descarte vale também na avaliação e cada descarte tira de
# um token um dos seus dois especialistas. Uma pista para escolher o fator: a razão máximo/média da
# carga (1,24 no MoE top-2 sem
# capacidade, média das 4 camadas na última janela) — mas sequências isoladas flutuam mais que a
# média (não medimos
# outros fatores).
#
# </details>

# %% [markdown]
# ## O que você aprendeu
#
# - A porta $g_i$ multiplica a saída do especialista: é o único caminho do gradiente até o
#   roteador. Com top-2 as saídas se **somam**. Você escreveu a camada e a loss de balanceamento
#   em poucas linhas e conferiu contra o pacote.
# - $\mathcal{L}_{bal} = N\sum_i f_i P_i$ vale 1 no equilíbrio (ou com o roteador uniforme) e, no
#   colapso total, $N/k$: $N$ com top-1, $N/2$ com top-2. $P_i$ vem do softmax completo.
# - Sem a loss de balanceamento o roteador colapsa; com α = 0,1 ela equilibra quase perfeitamente, e
#   o efeito na validação, numa semente, fica dentro do ruído entre sementes. O viés do
#   DeepSeek-V3 equilibra sem loss auxiliar.
# - Capacidade: com mínimo, por sequência e em ordem de posição — nunca zero, nunca espiando o
#   futuro; os descartados seguem pela residual, e descartar custa validação.
# - Compare MoE e denso com os mesmos **parâmetros ativos** e os mesmos tokens, e meça a
#   validação só com a entropia cruzada. Com 614 mil tokens o denso ganhou do MoE top-2 nas três
#   sementes; com 3× mais tokens o top-2 passou à frente nas duas sementes medidas (versão 0.2.1).
#   Outra versão ou outro número de threads mudam o resultado de um treino tanto quanto outra semente.
#
# **Para ler.** Os artigos estão na tabela do início. Um guia para a camada inteira, com os mesmos
# nomes: a seção de MoE do Switch Transformer (seções 2.1 e 2.2) e o Mixtral (seção 2.1). Termos:
# [glossário](../docs/glossario.md).

# %%
print(f"tempo total dos treinos: {total_s:.0f} s; figuras e tabela em {out_dir}/")
