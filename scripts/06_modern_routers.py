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
# # Capítulo 06 — Roteadores modernos e o que o roteador aprende
#
# [![Open In
# Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sagui-nlp/nanomoe/blob/main/notebooks/06_modern_routers.ipynb)
#
# O capítulo 03 fez um MoE no estilo Mixtral aprender e mediu com honestidade: no orçamento padrão,
# o denso ficou à frente do MoE top-2 nas três sementes, por pouco, e só com 3× mais tokens o top-2
# passou à frente (nas duas sementes testadas). Os MoEs que
# lideram hoje (DeepSeek-V3, Qwen3-MoE, OLMoE) mudaram o **roteador** e os **especialistas**, e os
# melhores relatos sobre MoE ensinam **olhando** para o roteamento. Este capítulo faz as duas
# coisas, com a promessa do curso: **uma chave de cada vez, medida**. Cada ideia abaixo é ligada
# sozinha sobre o MoE do capítulo 03, em dez sementes e dois regimes; depois, a receita do
# DeepSeek-V3 inteira.
#
# | ideia | artigo |
# |---|---|
# | top-1, loss $N\sum_i f_i P_i$, capacidade | [Switch Transformers](https://arxiv.org/abs/2101.03961) (2021) |
# | *router z-loss* | [ST-MoE](https://arxiv.org/abs/2202.08906) (2022) |
# | especialistas finos + compartilhados | [DeepSeekMoE](https://arxiv.org/abs/2401.06066) (2024) |
# | sigmoide, viés só escolhe, loss por sequência | [DeepSeek-V3](https://arxiv.org/abs/2412.19437), 2.1.2, eq. 12–20 |
# | viés atualizado por $\gamma\,\operatorname{sign}$ | [Loss-Free Balancing](https://arxiv.org/abs/2408.15664) (2024) |
# | primeiras camadas densas, $\alpha$ e $\gamma$ usados | [DeepSeek-V3](https://arxiv.org/abs/2412.19437), seção 4.2 |
# | balanceamento no lote global | [Demons in the Detail](https://arxiv.org/abs/2501.11873) (Qwen, 2025) |
# | saturação (seção 5.1) e coativação (seção 5.2) do roteamento | [OLMoE](https://arxiv.org/abs/2409.02060) (2024) |
#
# Cada ideia é um campo de `GPTConfig` (os padrões mantêm o capítulo 03 bit a bit):
# `moe_router`, `moe_routed_scaling`, `moe_balance_scope`, `moe_dense_layers`, e os especialistas
# finos são só `n_experts`, `moe_top_k` e `n_shared_experts` crescendo juntos. O código mora em
# `nanomoe/moe.py` (roteamento), `nanomoe/course/routing_analysis.py` (análise) e `nanomoe/course/crossover.py`
# (o experimento); as provas, em `tests/test_06_*.py`.

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

device = setup("06", written_for=NANOMOE_REF)  # 'cuda', 'mps' or 'cpu'

# %%
import json
import math
import time
from pathlib import Path

import torch

from nanomoe import GPT, modern_config, moe_config
from nanomoe.course.crossover import crossover, regime_tokenizer
from nanomoe.course.notebook import show_source
from nanomoe.course.one_switch import (
    VARIANTS,
    load_recorded,
    one_switch_caption,
    one_switch_panel,
    one_switch_table,
    pair_line,
    recorded_hardware,
    run_grid,
    saturation_curves,
    specialization_pairs,
    specialization_table,
    summarize,
    variant_config,
)
from nanomoe.course.plots import (
    plot_crossover,
    plot_matrices,
    plot_one_switch,
    plot_saturation,
    plot_token_routing,
    save_figure,
)
from nanomoe.course.routing_analysis import (
    CHAR_CLASS_PT,
    CHAR_CLASSES,
    char_class_ids,
    coactivation,
    position_bins,
    position_in_word,
    routing_of,
    routing_share,
    top_tokens_per_expert,
)
from nanomoe.data import encode_splits, read_corpus
from nanomoe.moe import MoE, balance_loss, global_balance_prepass
from nanomoe.paths import in_home
from nanomoe.training.cli import parse_args

# %% [markdown]
# ## Parâmetros
#
# O experimento completo (seção 4) são 11 variantes × 10 sementes × 2 regimes = 220 treinos de 300
# passos: 1 h 18 min (caracteres) e 1 h 32 min (BPE) de relógio na grade registrada, os dois regimes
# em paralelo em 2 processos de 1 thread (CPU x86_64; as sementes 0 a 2 sob carga, as outras com a
# máquina mais livre). O notebook **não** refaz tudo: por padrão treina só 3 variantes na
# semente 0 com caracteres (o denso, a base e a receita do DeepSeek-V3; poucos minutos numa CPU) e
# lê a grade inteira registrada em `docs/results/06/` (cada treino com o hardware em que rodou). A
# grade inteira, num regime: `--variants=all --seeds=0,1,2,3,4,5,6,7,8,9` (ou `uv run -m
# scripts.grid_06_one_switch --threads=1 [--tokenizer=bpe]`, o que gerou o registro). Num notebook,
# edite o dicionário ou defina `NANOMOE_ARGS`. `--tokenizer=bpe` troca os caracteres pelo BPE
# português do curso (resultados em `runs/06/bpe/`). `--quick` roda todas as variantes em segundos
# (é o que os testes usam). Um treino terminado fica salvo em `runs/06/one_switch/treinos/` e é
# reaproveitado se a mesma configuração for pedida de novo.

# %%
DEFAULTS = dict(
    quick=False,
    corpus="machado",
    source="",  # a local copy of the corpus (a folder of .txt files) when offline
    tokenizer="char",  # "char" or "bpe" (a byte-level BPE trained on the training split)
    bpe_vocab=1024,  # BPE vocabulary size (tokenizer="bpe")
    n_layer=2,
    n_head=4,
    n_embd=64,
    block_size=128,
    batch_size=16,
    steps=300,  # optimizer steps per run (same token budget for every run)
    lr=2e-3,
    min_lr=2e-4,
    warmup_steps=30,
    eval_interval=30,
    eval_iters=8,
    seeds="0",  # seeds trained here (the recorded grid has 0 to 9)
    variants="denso;base (MoE top-2);receita DeepSeek-V3",  # ";"-separated names of VARIANTS, or "all"
    val_tokens=131072,  # validation tokens of the final loss (each token's loss kept: standard errors)
    probe_seqs=64,  # validation sequences the routing analysis reads
    device="auto",
    out_dir="runs/06",
    threads=1,  # torch CPU threads (the recorded grid: 1); 0 = torch's default (all cores)
)
QUICK = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, steps=8, warmup_steps=2, eval_interval=4,
             eval_iters=2, seeds="0", variants="all", val_tokens=2048, probe_seqs=4, bpe_vocab=320)
args = parse_args(DEFAULTS, quick=QUICK)
out_rel = Path(args.out_dir) if args.tokenizer == "char" else Path(args.out_dir) / args.tokenizer  # runs/06/bpe
out_dir = in_home(out_rel)
out_dir.mkdir(parents=True, exist_ok=True)
if args.threads > 0:
    torch.set_num_threads(args.threads)
print(args)

# %% [markdown]
# ## 1. O roteador sigmoide (DeepSeek-V3)
#
# No Mixtral (capítulo 03) o roteador é um softmax: os $E$ escores competem e somam 1. O DeepSeek-V3
# (seção 2.1.2, eq. 12–16) usa uma **sigmoide** por especialista — afinidades independentes — e
# normaliza só sobre os $k$ escolhidos:
#
# $$s_i = \sigma(\mathbf{w}_i^\top x), \qquad S = \operatorname{top-}k\,(s_i + b_i), \qquad
# g_i = \rho\,\frac{s_i}{\sum_{j\in S} s_j}\ (i \in S)$$
#
# O viés $b_i$ (eq. 16; o balanceamento sem loss auxiliar do capítulo 03) **só escolhe**: as portas
# vêm de $s$ sem viés. Depois de cada passo, $b_i \leftarrow b_i + \gamma\,\operatorname{sign}(
# \bar c - c_i)$, com $c_i$ a carga do especialista $i$ e $\bar c$ a média ([Loss-Free
# Balancing](https://arxiv.org/abs/2408.15664); o V3 usa $\gamma = 0{,}001$, seção 4.2).
# $\rho$ é o *routed scaling factor* (`moe_routed_scaling`): **não está nas equações** do artigo;
# o valor 2,5 vem da configuração publicada do DeepSeek-V3 (`routed_scaling_factor` no
# `config.json` do modelo). O artigo também não traz uma ablação sigmoide × softmax: que a
# sigmoide ajude porque 256 especialistas deixam de competir num só softmax é uma **hipótese**, não
# um resultado do V3. O *node-limited routing* do V3 (cada token vai a no máximo 4 nós da máquina)
# é uma restrição de comunicação entre máquinas; aqui, num processo, ele não tem o que limitar e
# fica de fora. Construímos do zero e comparamos com o pacote:

# %%
torch.manual_seed(0)
small = moe_config(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16, n_experts=8, moe_top_k=2,
                   moe_router="sigmoid", moe_bias_balance=True, moe_routed_scaling=2.5)
layer = MoE(small)
layer.expert_bias.copy_(torch.linspace(-0.5, 0.5, 8))  # a bias as training would leave it
x = torch.randn(2, 5, 16)

s = torch.sigmoid(x @ layer.router.weight.T)  # (B, T, E) independent affinities
chosen = (s + layer.expert_bias).topk(2, dim=-1).indices  # the bias only chooses...
gates = s.gather(-1, chosen)  # ...the gates come from s without the bias
gates = 2.5 * gates / gates.sum(-1, keepdim=True)  # renormalized over the k chosen, times rho (routed scaling)

_, probs, topk_pkg, gates_pkg = layer.route(x)
assert torch.equal(chosen, topk_pkg)
torch.testing.assert_close(gates, gates_pkg)
print("igual ao pacote; soma das portas de cada token:", gates_pkg.sum(-1).flatten()[:4].tolist())
show_source(MoE.route)

# %% [markdown]
# A loss de balanceamento precisa de uma distribuição sobre os especialistas; com a sigmoide, o
# DeepSeek-V3 (eq. 19) normaliza os escores, $s_i / \sum_j s_j$. É isso que `probs` devolve:

# %%
torch.testing.assert_close(probs, s / s.sum(-1, keepdim=True))
print("probs somam 1:", probs.sum(-1).flatten()[:3].tolist())

# %% [markdown]
# **O viés escolhe; a loss conta sem viés.** Na loss por sequência do V3 (eq. 17–20),
# $f_i = \frac{N}{kT}\sum_t \mathbb{1}\big(s_{i,t} \in \operatorname{Topk}(\{s_{j,t}\}, k)\big)$
# conta o top-$k$ dos escores **sem** o viés $b_i$: o viés só decide para onde o token vai (eq. 16).
# Num lote feito à mão (3 sequências × 5 tokens, +3 de viés no especialista 0, o que muda escolhas),
# a eq. 18 escrita com laços bate com o pacote; contar a escolha enviesada daria outro número:

# %%
torch.manual_seed(11)
hand = MoE(moe_config(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16, n_experts=4, moe_top_k=2,
                      moe_router="sigmoid", moe_bias_balance=True, moe_balance_scope="sequence",
                      moe_aux_loss_coef=1.0, moe_z_loss_coef=0.0))
xh = torch.randn(3, 5, 16)
with torch.no_grad():
    sh = torch.sigmoid(xh @ hand.router.weight.T)  # (3, 5, 4) scores without the bias
hand.expert_bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))


def eq18(scores, chosen):  # DeepSeek-V3 eq. 17-20 with loops: mean over sequences of sum_i f_i P_i
    Bh, Th, Eh = scores.shape
    total = 0.0
    for b in range(Bh):
        for i in range(Eh):
            f_i = Eh / (2 * Th) * sum(int(i in chosen[b, t].tolist()) for t in range(Th))
            P_i = sum(float(scores[b, t, i] / scores[b, t].sum()) for t in range(Th)) / Th
            total += f_i * P_i
    return total / Bh


_, _, biased_choice, _ = hand.route(xh)
_, aux_h, _ = hand(xh)
moved = (biased_choice.sort(-1).values != sh.topk(2, -1).indices.sort(-1).values).any(-1)  # (3, 5)
print(f"tokens cuja escolha o viés mudou: {int(moved.sum())} de 15")
print(f"eq. 18 à mão (top-k sem viés): {eq18(sh, sh.topk(2, -1).indices):.6f}   pacote: {float(aux_h):.6f}   "
      f"contando a escolha enviesada: {eq18(sh, biased_choice):.6f}")
assert abs(eq18(sh, sh.topk(2, -1).indices) - float(aux_h)) < 1e-5

# %% [markdown]
# ## 2. Onde se conta $f_i$: micro-lote, sequência ou lote global
#
# A loss de balanceamento $\mathcal{L}_{bal} = N\sum_i f_i P_i$ depende de **onde** se contam as
# atribuições $f_i$:
#
# - **micro-lote** (capítulo 03): os tokens deste forward;
# - **sequência** (DeepSeek-V3, eq. 17–20, a loss "complementar"): cada sequência sozinha, depois a
#   média — impede que uma sequência inteira se amontoe em poucos especialistas;
# - **lote global** (Qiu et al. 2025): todos os micro-lotes do passo e todos os processos. O
#   argumento do artigo: balancear cada micro-lote pequeno obriga cada trecho de texto a usar
#   todos os especialistas, o que briga com a especialização por domínio.
#
# Como $f_i P_i$ não é linear, "global" exige somar as **contagens** primeiro e só então calcular a
# loss — calcular a loss por processo e tirar a média é outra coisa. Com um micro-lote por passo e
# vários processos, o passo de treino chama o forward com `moe_loads=BALANCE_AFTER_FORWARD`: cada
# camada deixa o termo de balanceamento de fora e entrega $P_i$ (com gradiente) e as suas contagens;
# depois do forward, `balance_after_forward` soma as contagens entre os processos (`all_reduce`) e
# acrescenta o termo à loss antes do backward (num processo só, o forward já é o passo inteiro e
# usa as próprias contagens). Com acumulação de gradiente, o micro-lote 1
# precisaria das contagens do micro-lote 2, que ainda não rodou; a nossa solução, exata:
# `global_balance_prepass` roda **antes** do passo um forward sem gradiente sobre os micro-lotes do
# passo, só para contar, soma as contagens entre os processos e as entrega a cada forward do passo
# (`model(x, y, moe_loads=...)`). Quem decide o que somar é o passo de treino, nunca a camada. Custa
# um forward a mais por passo, ~1/3 do custo de um passo. Como os micro-lotes têm o mesmo tamanho,
# a média das losses $N\sum_i f_i P_i^{(m)}$ é exatamente $N\sum_i f_i P_i$ do passo inteiro.
#
# Construímos a loss por sequência à mão e conferimos:

# %%
B, T, E, k = 3, 6, 4, 2
torch.manual_seed(1)
p = torch.randn(B, T, E).softmax(-1)
idx = p.topk(k, -1).indices
per_seq = []
for b in range(B):  # each sequence alone
    f_b = torch.zeros(E)
    for e in idx[b].flatten().tolist():
        f_b[e] += 1 / (T * k)
    per_seq.append(E * (f_b * p[b].mean(0)).sum())
torch.testing.assert_close(torch.stack(per_seq).mean(), balance_loss(p, idx, "sequence"))
print(f"por sequência: {balance_loss(p, idx, 'sequence'):.4f}   micro-lote: {balance_loss(p, idx, 'micro_batch'):.4f}")

# %% [markdown]
# E o lote global: 2 micro-lotes com a pré-passagem dão a mesma loss auxiliar e os mesmos
# gradientes que um lote só com as 4 sequências.

# %%
torch.manual_seed(2)
tiny = moe_config(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, n_experts=4, moe_top_k=2,
                  moe_balance_scope="global", moe_aux_loss_coef=1.0, moe_z_loss_coef=0.0)
model = GPT(tiny)
xb = torch.randint(0, 32, (4, 16))

# by hand: one forward of the whole batch, f and P over all 4 sequences, per MoE layer
by_hand = 0.0
for st in model.hidden_states(xb)[2]:
    f = st["load"] / st["load"].sum()
    by_hand += 4 * (f * st["importance"]).sum()
_, loss_full = model(xb, xb)
grads_full = torch.autograd.grad(loss_full, list(model.parameters()))

# the package: two micro-batches of 2, counts gathered by the pre-pass
step_loads = global_balance_prepass(model, [xb[:2], xb[2:]])
aux, total = 0.0, 0.0
for part in (xb[:2], xb[2:]):
    out = model(part, part, moe_loads=step_loads)
    aux += out.aux_loss / 2
    total = total + out.loss / 2
grads_acc = torch.autograd.grad(total, list(model.parameters()))
torch.testing.assert_close(aux, by_hand)
for a, b in zip(grads_acc, grads_full):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
print(f"loss global à mão {float(by_hand):.5f} = pacote com 2 micro-lotes {float(aux):.5f}; gradientes iguais")
show_source(global_balance_prepass)

# %% [markdown]
# A mesma prova com 2 processos (gloo) contra 1 processo com acumulação está em
# `tests/test_06_global_balance.py`.
#
# ## 3. Especialistas finos (DeepSeekMoE) e camadas densas no começo (DeepSeek-V3)
#
# DeepSeekMoE corta cada especialista em $m$ pedaços e escolhe $m$ vezes mais: $E$ e $k$ crescem
# juntos, a largura de cada especialista cai, e os **parâmetros ativos** ficam iguais. O ganho é
# combinatório: $\binom{8}{2} = 28$ combinações de especialistas por token contra
# $\binom{32}{8} \approx 10^7$. Um especialista **compartilhado**, sempre ligado, guarda o que
# todos precisariam aprender. O DeepSeek-V3 ainda deixa as **primeiras camadas densas**
# (`moe_dense_layers`; 3 de 61 no V3). O V3 não explica a escolha; o DeepSeekMoE (seção 5.1.2),
# que deixa só a 1ª camada densa, diz que nela o balanceamento de carga converge bem mais devagar.
# Que o roteador ali ainda não tenha contexto para escolher bem é uma **hipótese**.

# %%
shape = dict(vocab_size=96, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
             n_embd=args.n_embd, dropout=0.0)
dense_active = GPT(modern_config(**shape)).num_params(active=True)
for name in VARIANTS:
    cfg, train_kw = variant_config(name, shape)
    m = GPT(cfg)
    kinds = "".join("M" if b.is_moe else "D" for b in m.transformer.h)
    extra = m.num_params(active=True) - dense_active
    print(f"{name:31s} camadas {kinds}  largura {cfg.expert_hidden_dim if cfg.n_experts else cfg.hidden_dim:4d}  "
          f"ativos {m.num_params(active=True):>7,} ({100 * extra / dense_active:+.1f}%)  totais {m.num_params():>7,}  "
          f"combinações {math.comb(cfg.n_experts, cfg.moe_top_k) if cfg.n_experts else 1:>10,}"
          + (f"  {train_kw['grad_accum']} micro-lotes de {train_kw['batch_size']}" if train_kw else ""))

# %% [markdown]
# Os parâmetros **ativos** só diferem pelos roteadores, $C \times E$ por camada MoE: no modelo de
# vocabulário 96 acima, +1,0% com 8 especialistas em 2 camadas, +4,1% com 32, +0,5% e +2,0% quando
# a 1ª camada é densa; com o BPE (vocabulário 1024, 160 064 ativos no denso), +0,6% e +2,6%. O
# especialista compartilhado não muda os ativos: a largura dos roteados encolhe para caber (96 → 64).
#
# ## 4. O experimento: uma chave de cada vez
#
# Corpus: Machado de Assis, caracteres (ou, com `--tokenizer=bpe`, o BPE português de 1024 tokens
# treinado só na parte de treino), 90% treino / 10% validação. Todos os treinos usam a mesma
# receita (AdamW, warmup + cosseno, 300 passos de 16 sequências de 128 tokens = 0,61 M tokens), os
# mesmos lotes na mesma ordem (por semente) e os mesmos **parâmetros ativos**. A **base** é o MoE
# do capítulo 03: 8 especialistas, top-2, softmax, loss de balanceamento $\alpha = 0{,}01$ no
# micro-lote e *z-loss* 1e-3. Cada variante muda **uma** coisa:
#
# | variante | o que muda (o resto é a base) |
# |---|---|
# | sigmoide | `moe_router="sigmoid"`: escores sigmoides, portas renormalizadas sobre os $k$ |
# | viés, α = 0 | o viés de seleção (γ = 0,001) **no lugar** da loss de balanceamento |
# | loss por sequência | $f_i$ contado por sequência (a forma da eq. 17–20), mesmo $\alpha$ |
# | micro-lotes de 4 | o passo em 4 micro-lotes de 4 sequências (acumulação); $f_i$ em cada micro-lote |
# | lote global (micro-lotes de 4) | o mesmo, mas $f_i$ do passo inteiro (pré-passagem); compara-se com o anterior |
# | 1 compartilhado | 8 × top-2 + 1 especialista sempre ligado (largura 64 em vez de 96) |
# | finos 32×top-8 | 32 especialistas de largura 24, top-8 |
# | 1ª camada densa | a camada 0 volta a ser um MLP denso |
# | receita DeepSeek-V3 | todas as chaves do V3 juntas (abaixo) |
#
# A **receita DeepSeek-V3**: sigmoide; viés de seleção com $\gamma = 0{,}001$; loss por sequência
# com $\alpha$ = 1e-4 (seção 4.2); sem *z-loss*; $\rho = 2{,}5$ (da configuração publicada);
# 32 especialistas finos top-7 + 1 compartilhado (o V3: 256 top-8 + 1); a 1ª camada densa (o V3:
# 3 de 61). Sem o *node-limited routing*, que só existe entre máquinas.
#
# Por que o par "micro-lotes de 4": com um micro-lote por passo num processo (a base), o $f_i$ do
# micro-lote **é** o do lote global, e as duas losses são idênticas. Para o lote global mudar
# alguma coisa, o passo precisa de vários micro-lotes; o par mede só a diferença do escopo.
#
# A loss de validação final é medida em **todos** os tokens dos primeiros 131 072 tokens de
# validação (1 024 blocos de 128), guardando a loss de cada token: assim dá para dizer o erro-padrão
# da estimativa. Como os tokens de um bloco são correlacionados, o erro-padrão é calculado pelos
# blocos (desvio das médias dos blocos / $\sqrt{1024}$), e a diferença entre dois modelos é
# **pareada** (os mesmos tokens).

# %%
text = read_corpus(args.corpus, source=args.source or None)
if args.quick:
    text = text[:200_000]
tok = regime_tokenizer(args.tokenizer, text, args.bpe_vocab)
train_ids, val_ids = encode_splits(tok, text)
print(f"{len(text):,} caracteres, tokenizador {args.tokenizer} com vocabulário de {tok.vocab_size}; "
      f"{len(train_ids):,} tokens de treino ({len(text) / (len(train_ids) + len(val_ids)):.2f} caracteres/token)")

shape = dict(shape, vocab_size=tok.vocab_size)
names = list(VARIANTS) if args.variants == "all" else [n.strip() for n in args.variants.split(";") if n.strip()]
seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
probe = torch.tensor(val_ids[: args.probe_seqs * args.block_size], dtype=torch.long).view(args.probe_seqs, -1)
pieces = [tok.decode([i]) for i in probe.flatten().tolist()]  # one string per token (a character, for char)
train_kw = dict(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                warmup_steps=args.warmup_steps, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
                weight_decay=0.1, grad_clip=1.0, device=args.device, sample_tokens=0)
print(f"{len(names) * len(seeds)} treinos aqui × {args.steps * args.batch_size * args.block_size:,} tokens")

t0 = time.perf_counter()
records, runs = run_grid(names, seeds, shape, train_kw, (train_ids, val_ids), probe, pieces, args.val_tokens,
                         cache_dir=out_dir / "one_switch" / "treinos", progress=not args.quick)
for r in records:
    print(f"{r['name']:31s} semente {r['seed']}  val {r['val']['mean']:.4f} ± {r['val']['se_blocks']:.4f} "
          f"(erro-padrão, {r['val']['tokens']:,} tokens)  {r['seconds']:.0f} s  {r['tokens_per_s']:,.0f} tokens/s"
          + ("  (treino já salvo, reaproveitado)" if r["cached"] else ""))
print(f"{len(records)} treinos em {time.perf_counter() - t0:.0f} s")
_ = (out_dir / "one_switch.json").write_text(json.dumps({"args": dict(vars(args)), "summary": summarize(records),
                                                         "runs": records}, indent=1, ensure_ascii=False),
                                              encoding="utf-8")

# %% [markdown]
# ### Estes treinos contra o registro
#
# A grade inteira (220 treinos) está registrada em `docs/results/06/one_switch.json` (caracteres) e
# `docs/results/06/bpe/one_switch.json` (BPE), cada treino com o hardware em que rodou. Os treinos
# refeitos aqui usam a mesma configuração e a mesma semente: na mesma CPU, com 1 thread, a loss
# final sai igual; em outro hardware, perto.

# %%
recorded = {reg: load_recorded(f"docs/results/06/{'' if reg == 'char' else 'bpe/'}one_switch.json", NANOMOE_REF)
            for reg in ("char", "bpe")}
rec_here = recorded[args.tokenizer] if not args.quick else None
if rec_here is not None:
    old = {(r["name"], r["seed"]): r for r in rec_here["runs"]}
    for r in records:
        o = old.get((r["name"], r["seed"]))
        if o is not None:
            print(f"{r['name']:31s} semente {r['seed']}: aqui {r['val']['mean']:.4f}, "
                  f"registrado {o['val']['mean']:.4f} "
                  f"(diferença {r['val']['mean'] - o['val']['mean']:+.4f}; registrado em {o['hardware']})")

# %% [markdown]
# ### Onde o MoE passa o denso (os treinos desta execução)
#
# A pergunta do capítulo 03, agora para a base e a receita do V3: a partir de quantos tokens (e de
# quantos segundos de treino) a loss de validação do MoE fica abaixo da do denso da mesma semente e
# não volta mais. O relógio é o desta execução.

# %%
by_variant = {}
for (name, seed), r in runs.items():
    by_variant.setdefault(name, {})[seed] = r["history"]
for (name, seed), r in runs.items():
    dense = runs.get(("denso", seed))
    if dense is None or name == "denso":
        continue
    tok_x = crossover(dense["history"], r["history"], "tokens")
    sec_x = crossover(dense["history"], r["history"], "elapsed_s")
    tok_cell = "nunca" if tok_x is None else "desde o início" if tok_x == 0 else f"{tok_x / 1e6:.2f} M"
    tok_cell = tok_cell.replace(".", ",")
    sec_cell = "nunca" if sec_x is None else "desde o início" if sec_x == 0 else f"{sec_x:.0f} s"
    print(f"{name:31s} semente {seed}: cruza o denso em tokens: {tok_cell}; "
          f"em tempo: {sec_cell}")
regime = "caracteres" if args.tokenizer == "char" else f"BPE português, {tok.vocab_size} tokens"
where = sorted({r.get("hardware") or "lugar não registrado" for r in runs.values()})  # where the times come from
fig = plot_crossover(by_variant, reference="denso" if "denso" in by_variant else None, hardware=" + ".join(where),
                     title=f"Machado ({regime}), treinos desta execução: mesmos parâmetros ativos")
save_figure(fig, out_dir / "crossover.png")

# %% [markdown]
# ### A grade registrada: Δ contra a base, semente a semente
#
# Para cada variante e semente, a loss de validação final (131 072 tokens) menos a da base da
# mesma semente; a média ± o desvio-padrão entre as 10 sementes; o intervalo de 95% da média (t de
# Student); em quantas sementes a variante ficou abaixo da base; e o erro-padrão pareado da
# estimativa (a média sobre as sementes). A linha do **denso** dá a escala do ruído entre sementes;
# a legenda de cada regime traz o desvio-padrão da loss do próprio denso de uma semente para outra.
# Na figura, cada ponto é uma semente, e a barra é o intervalo de 95% da média: uma barra que cruza
# o zero é **diferença não mensurável**.

# %%
panels = {}
for reg, res in recorded.items():
    if res is None:
        continue
    print(f"\n{'caracteres' if reg == 'char' else 'BPE'}: {one_switch_caption(res)}")
    print(one_switch_table(res))
    panels["caracteres" if reg == "char" else "BPE português"] = one_switch_panel(res)
if panels:
    fig = plot_one_switch(panels, order=[n for n in VARIANTS if n != "base (MoE top-2)"],
                          title="Uma chave de cada vez: Δ loss de validação contra a base, por semente ("
                                + recorded_hardware(recorded) + ")")
    save_figure(fig, out_dir / "one_switch.png")
    fig

# %% [markdown]
# ### Lote global contra micro-lote: especialização
#
# O artigo do lote global ([Qiu et al. 2025](https://arxiv.org/abs/2501.11873)) argumenta que
# balancear cada micro-lote atrapalha a **especialização**, não a loss. Medimos a especialização
# como a parte da incerteza sobre o especialista que o token explica: $1 - H(e \mid x)/H(e)$, com
# $e$ o especialista de uma atribuição e $x$ a classe do token (vogal, espaço...) ou o próprio
# token. 0 = o roteador ignora o token; 1 = o token decide o especialista. Nas 64 sequências de
# validação da sonda, por camada, nas 10 sementes registradas (média ± desvio), e a diferença
# pareada, semente a semente, entre o lote global e os micro-lotes de 4:

# %%
for reg, res in recorded.items():
    if res is not None:
        print(f"\n{'caracteres' if reg == 'char' else 'BPE'}")
        print(pair_line(res, "lote global (micro-lotes de 4)", "micro-lotes de 4"))
        print(specialization_table(res, ["micro-lotes de 4", "lote global (micro-lotes de 4)", "base (MoE top-2)"]))
        print(specialization_pairs(res, "lote global (micro-lotes de 4)", "micro-lotes de 4"))

# %% [markdown]
# ## 5. O que o roteador aprendeu
#
# Lemos a base (MoE top-2, a primeira semente desta execução) em `probe_seqs` sequências de
# validação. Primeiro, a **coativação** (OLMoE, seção 5.2): na linha $i$, a fração dos tokens que
# escolheram $i$ e também escolheram $j$. Com top-2 de 8 e um roteador que ignorasse o token, cada
# célula fora da diagonal valeria $1/7$.

# %%
main = runs["base (MoE top-2)", seeds[0]]
E = main["model"].config.n_experts
decisions = routing_of(main["model"], probe)  # one (B, T, k) per MoE layer
mats = [coactivation(d, E) for d in decisions]
fig = plot_matrices(mats, [f"camada {i}" for i in range(len(mats))],
                    title=f"Coativação: P(j escolhido | i escolhido) — base, semente {seeds[0]}, {main['hardware']}")
save_figure(fig, out_dir / "coactivation.png")

# %% [markdown]
# **Especialização por classe de caractere.** Cada coluna é uma classe (vogal, consoante, espaço...);
# cada célula, a fração das atribuições dessa classe que foi para o especialista. A marca branca na
# barra de cores é $1/E$ (o roteador ignora a classe); acima dela, preferência. Com o BPE, um token
# é classificado pelo seu primeiro caractere (um token que começa com espaço é um **início de
# palavra**), e listamos também os tokens que cada especialista mais recebe.

# %%
classes = char_class_ids([p[:1] for p in pieces]).view(probe.shape)
present = [c for c in range(len(CHAR_CLASSES)) if (classes == c).any()]
mats = [routing_share(d, classes, len(CHAR_CLASSES), E)[:, present] for d in decisions]
names = dict(CHAR_CLASS_PT, space="início de palavra") if args.tokenizer == "bpe" else CHAR_CLASS_PT
labels = [names[CHAR_CLASSES[c]] for c in present]
what = "caractere" if args.tokenizer == "char" else "token (pelo 1º caractere)"
fig = plot_matrices(mats, [f"camada {i}" for i in range(len(mats))], xlabels=labels, center=1 / E,
                    title=f"Para onde vai cada classe de {what} (marca na barra = 1/E) — base, semente {seeds[0]}")
save_figure(fig, out_dir / "specialization_classes.png")
if args.tokenizer != "char":
    k = main["model"].config.moe_top_k
    print("última camada: os tokens que cada especialista mais recebe (em % das ocorrências do token)")
    for e, top in enumerate(top_tokens_per_expert(decisions[-1], probe, E, n=6)):
        print(f"  E{e}: " + "  ".join(f"{tok.decode([i])!r} {k * v:.0%}" for i, v in top if v > 0))

# %% [markdown]
# **Posição na palavra e na sequência** (última camada MoE): coluna 0 = não-letra, 1 = primeira
# letra da palavra, 2 = segunda... e, à direita, a posição na sequência de contexto em 8 faixas
# (com o BPE, só a sequência: um token já é um pedaço de palavra).

# %%
in_seq = position_bins(*probe.shape, n_bins=8)
mats, titles = [routing_share(decisions[-1], in_seq, 8, E)], ["posição na sequência (8 faixas)"]
if args.tokenizer == "char":
    in_word = position_in_word(pieces, max_pos=8).view(probe.shape)
    mats, titles = [routing_share(decisions[-1], in_word, 9, E)] + mats, ["posição na palavra (0 = não-letra)"] + titles
fig = plot_matrices(mats, titles, xlabel="posição", center=1 / E,
                    title=f"Última camada: o roteador olha a posição? — base, semente {seeds[0]}")
save_figure(fig, out_dir / "specialization_position.png")

# %% [markdown]
# **Saturação do roteamento** (OLMoE, seção 5.1). O OLMoE a define como a **sobreposição média**
# entre os $k$ especialistas de um token num ponto do treino e os $k$ do modelo final
# ($|S_t \cap S_{\text{final}}|/k$, média sobre os tokens); ao lado, uma versão mais dura: a
# fração dos tokens cujo **conjunto** de $k$ já é exatamente o final. Com
# top-2 de 8 ao acaso, a sobreposição valeria $2/8 = 25\%$ e o conjunto exato $1/28 \approx 3{,}6\%$.

# %%
sat = saturation_curves(main["snapshots"])
fig = plot_saturation(sat["tokens"], sat["exact"], overlap=sat["overlap"],
                      title=f"Base (MoE top-2), semente {seeds[0]}: roteamento igual ao final — {main['hardware']}")
save_figure(fig, out_dir / "saturation.png")
print("tokens até 50% / 90%, por camada (conjunto exato | sobreposição do OLMoE):")
for li in range(len(sat["exact"])):
    cells = []
    for curve in (sat["exact"][li], sat["overlap"][li]):
        reach = [next((t for t, v in zip(sat["tokens"], curve) if v >= q), None) for q in (0.5, 0.9)]
        cells.append(", ".join("—" if t is None else f"{t / 1e6:.2f} M".replace(".", ",") for t in reach))
    print(f"  camada {li}: {cells[0]} | {cells[1]}")

# %% [markdown]
# **Um texto colorido pelo especialista** (a vista do capítulo 03): o especialista top-1 de cada
# token (caractere) em cada camada.

# %%
sentence = "Olhos de cigana oblíqua e dissimulada." if not args.quick else text[:24]
ids = torch.tensor([tok.encode(sentence)])
top1 = [d[0, :, 0].tolist() for d in routing_of(main["model"], ids)]
fig = plot_token_routing([tok.decode([i]) for i in ids[0].tolist()], top1, E)
save_figure(fig, out_dir / "token_routing.png")

# %%
print(f"figuras e resultados em {out_rel}/ (one_switch.json, one_switch.png, crossover.png, coactivation.png, ...)")

# %% [markdown]
# ## 6. Resultados
#
# **A grade registrada.** `uv run -m scripts.grid_06_one_switch --threads=1` e o mesmo com
# `--tokenizer=bpe`, dois processos de 1 thread ao mesmo tempo numa CPU x86_64 de 2 núcleos; as
# sementes 0 a 2 rodaram com a máquina compartilhada com outros trabalhos (carga média entre ~4 e 8)
# e as sementes 3 a 9 depois, acrescentadas ao mesmo registro (`--extend`). Por isso os tempos e os
# tokens/s desta grade são ruidosos e não entram nas conclusões; as losses não dependem da carga.
# Modelo: 2 camadas, $C = 64$, 4 cabeças, contexto 128; 300 passos de 16 sequências (0,61 M tokens
# por treino, para caber 220 treinos na CPU). Resultado: `docs/results/06/one_switch.json` e
# `docs/results/06/bpe/one_switch.json`; as tabelas são as que a seção 4 imprime.
#
# **Quanto ruído há.** A loss de validação de um treino é a média sobre 131 072 tokens; o
# erro-padrão dessa média (pelas médias de 1 024 blocos) é 0,0035 a 0,0040 nats com caracteres e
# 0,0042 a 0,0050 com BPE, e o de uma diferença pareada entre dois modelos nos mesmos tokens é ainda
# menor (0,0010 a 0,0015 nats, na média de cada variante). O ruído que importa é outro: o **mesmo**
# modelo denso, só trocando a semente (inicialização e ordem dos lotes), varia 0,0403 nats
# (desvio-padrão, caracteres) e 0,1171 (BPE).
#
# **Como ler.** Para cada variante temos 10 diferenças pareadas (uma por semente). Chamamos de
# **mensurável** um efeito cujo intervalo de 95% da média (t de Student com 9 graus de liberdade:
# média ± 2,262 · desvio/√10) não contém zero; o resto é **diferença não mensurável** nesta grade, e
# não se ordena. São 10 comparações por regime: mesmo sem nenhum efeito real, ~1 em cada 20 intervalos
# exclui o zero por acaso, então um intervalo que mal deixa o zero de fora é um indício, não uma lei.
# As 3 sementes da primeira versão deste capítulo não bastavam: com elas, a receita do V3 parecia
# melhor que a base com caracteres (abaixo dela nas três), o que as sementes 3 a 9 não confirmaram.
#
# **Caracteres: o platô decide, e nada é mensurável.** Nenhum intervalo exclui o zero. Entre o MoE
# top-2 e o denso: Δ do denso −0,0596 ± 0,1641 (intervalo −0,1770 a +0,0578; o denso fica abaixo da
# base em 7 das 10 sementes). A semente 4 mostra por quê: a **base** dessa semente ficou presa no
# platô de ~3,1 nats até o passo 240 (loss final 2,716, contra 2,226 a 2,310 nas outras sementes),
# então o Δ da semente 4 é muito negativo para quem saiu cedo do platô (−0,515 do denso, −0,511 da
# receita V3, −0,472 do compartilhado), mas pequeno ou positivo para as variantes que também ficaram
# presas (sigmoide −0,071; loss por sequência +0,171, micro-lotes de 4 +0,073, lote global +0,090).
# Do outro lado, uma variante presa no platô dá um Δ enorme e positivo (+0,680 da sigmoide na
# semente 0, +0,532 dos micro-lotes de 4 na semente 1). A loss final com caracteres, neste
# orçamento, mede sobretudo **quando** o treino saiu do platô (exercício 6), e isso varia mais com a
# semente do que com a chave. A receita DeepSeek-V3 inteira fica abaixo da base em 7 de 10 sementes,
# −0,0705 ± 0,1589 (intervalo −0,1841 a +0,0431): **nenhuma diferença mensurável**.
#
# **BPE português: menos platô, dois efeitos mensuráveis, ambos para pior.** O desvio do próprio
# denso entre sementes é grande (0,1171), e até a vantagem da base sobre o denso não é mensurável:
# Δ do denso +0,0683 ± 0,1205 (intervalo −0,0179 a +0,1545; o denso fica abaixo da base em 2 das 10
# sementes). Os **finos 32×top-8** são piores: +0,0874 ± 0,0711, intervalo +0,0365 a +0,1382, acima
# da base em 9 de 10 sementes — mensurável. A **receita DeepSeek-V3** também fica acima da base:
# +0,0536 ± 0,0704, intervalo +0,0032 a +0,1040, em 7 de 10 sementes — mensurável pela regra, mas por
# pouco (o tipo de resultado que, entre 10 comparações, o acaso também produz). A **1ª camada densa**
# fica acima da base em 9 de 10 sementes, mas a semente 8 (−0,145) puxa o intervalo para −0,0127 a
# +0,0923: **nenhuma diferença mensurável** (9 de 10 é um indício, não uma medida). Sigmoide, viés
# com α = 0, loss por sequência, micro-lotes de 4, lote global e 1 compartilhado: **nenhuma
# diferença mensurável**. Em resumo: nenhuma peça da receita, sozinha, ajuda de forma mensurável
# nesta escala; com BPE, os especialistas finos e a receita inteira ficam mensuravelmente **acima**
# da base (são piores).
#
# **Lote global contra micro-lote.** A loss do lote global (4 micro-lotes de 4) menos a dos
# micro-lotes de 4, semente a semente, tem média −0,0556 com caracteres (intervalo ± 0,1143; a
# semente 1, −0,485, é a dos micro-lotes presos no platô) e +0,0052 com BPE (± 0,0389): nenhuma
# diferença mensurável na loss. O que o artigo do lote global promete é especialização, e nós
# medimos: a fração da incerteza sobre o especialista que a classe do token explica,
# $1 - H(e|x)/H(e)$, é, na camada 0, 0,283 ± 0,046 com o lote global contra 0,266 ± 0,048 com
# micro-lotes de 4 (caracteres) e 0,170 ± 0,017 contra 0,174 ± 0,041 (BPE); pelo próprio token,
# 0,495 contra 0,496 e 0,619 contra 0,628. A diferença pareada (global − micro, por semente) tem
# intervalo que contém o zero em todas as camadas e nos dois regimes, com uma exceção: pelo token,
# com BPE, na camada 0, o lote global fica **abaixo** em 9 de 10 sementes (média −0,0088, intervalo
# ± 0,0079), o contrário do que o artigo prevê — uma camada de um regime, no limite da regra, um
# indício e não uma lei. Nenhum **ganho** mensurável de especialização com o lote global nesta
# escala. A tabela completa (por camada, pela classe e pelo próprio token) é a que o notebook imprime
# na seção 4. Um aviso: o artigo mede com lotes globais de milhares de sequências e micro-lotes de
# poucas; aqui, 16 contra 4, num modelo de 100 a 160 mil parâmetros ativos e 0,61 M tokens — um
# teste pequeno da ideia, não da escala do artigo.
#
# **O que o roteador aprendeu** (a base, semente 0, com caracteres: as figuras desta execução, em
# `docs/results/06/`). Na camada 0, os especialistas 2 e 3 recebem quase todos os espaços e quebras
# de linha, e andam juntos (quando o 2 é escolhido, o 3 também é em ~80% das vezes); a pontuação vai
# para 0 e 4, as maiúsculas para 0 e 5, as letras acentuadas para 0 e 6, as vogais para 1 e 7. Na
# camada 1, os espaços vão para 0 e 5 (de novo um par), a pontuação para 2 e 6, as maiúsculas e
# consoantes para 4 e 7. A posição **na palavra** importa na última camada (0 e 5 recebem as
# não-letras, 4 e 7 a primeira letra, 5 a segunda, 1 e 3 as letras do fim de palavras longas); a
# posição **na sequência** não importa (tudo perto de $1/E$). A saturação depende da definição: pela
# do OLMoE (sobreposição média), metade dos especialistas finais já está escolhida com 0,12 M
# (camada 0) e 0,18 M (camada 1) tokens e 90% com 0,49 M e 0,55 M; pelo conjunto exato, 50% só com
# 0,31 M nas duas camadas e 90% só no último ponto (0,61 M). Nos dois casos o roteamento ainda muda
# até o fim dos 0,61 M tokens — não é a saturação precoce que o OLMoE encontra ao longo de trilhões
# de tokens, e nem deveria ser comparável: aqui o treino inteiro é o começo de um treino.
#
# **Com o BPE** (a base, semente 0; figuras em `docs/results/06/bpe/`), a lista dos tokens que cada
# especialista mais recebe na última camada se lê como gramática: um especialista fica com as
# palavras curtas mais frequentes (` e`, ` que`, ` se`, ` não`, ` era`), outro com vírgulas e
# artigos/contrações (`,`, ` a`, ` da`, ` do`), outro com terminações (`ia`, `ão`, `ram`, `to`),
# outros com quebras de linha e pontuação ou com sílabas do meio da palavra. Pela classe do
# primeiro caractere, na camada 0 os dígitos e "outros" vão para 1 e 3, os inícios de palavra para
# 5, a pontuação para 2; na camada 1, as maiúsculas para 2 e 7. A saturação pela sobreposição do
# OLMoE chega a 50% com 0,18 M e 0,25 M tokens (camadas 0 e 1) e a 90% com 0,43 M e 0,55 M; pelo
# conjunto exato, 50% com 0,25 M e 0,37 M.
#
# ## Exercícios
#
# **1. Top-1 com roteador sigmoide.** Com $k = 1$, renormalizar a porta sobre o escolhido dá
# $g = s_i / s_i = 1$. Treine uma camada `MoE` com `moe_router="sigmoid"`, `moe_top_k=1`, sem losses
# auxiliares, e meça a norma do gradiente do roteador vindo só da saída, com a porta crua e com
# `layer.renormalize = True` forçado. Por que o pacote ignora `moe_renormalize` quando $k = 1$?
#
# <details><summary>Resposta medida</summary>
#
# Numa camada de 8 especialistas, $C = 16$, 16 tokens, `y.square().sum().backward()`: norma do
# gradiente do roteador 3,2e-5 com a porta crua $s_i$ e 1,3e-12 (zero
# numérico) com a porta renormalizada. Com $g = 1$ a saída não depende dos escores: o roteador só
# receberia gradiente das losses auxiliares e nunca aprenderia com o modelo de linguagem. Por isso,
# como no Switch, o pacote usa a porta crua com $k = 1$ (e a exportação para o Mixtral recusa $k=1$).
# </details>
#
# **2. Micro-lote contra sequência.** Construa um lote de 2 sequências, $E = 4$, $k = 2$, em que a
# primeira sequência manda todos os tokens para os especialistas 0 e 1 e a segunda para 2 e 3 (com
# `probs` iguais às escolhas). Quanto vale `balance_loss` com `"micro_batch"` e com `"sequence"`? O
# que isso diz sobre a loss por sequência do DeepSeek-V3 e sobre o argumento do artigo do lote global?
#
# <details><summary>Resposta medida</summary>
#
# `balance_loss(p, idx, "micro_batch")` = 1,0 (o lote, somado, está perfeitamente equilibrado) e
# `balance_loss(p, idx, "sequence")` = 2,0 $= E/k$ (cada sequência, sozinha, está colapsada em 2
# especialistas) — o teste `test_sequence_balance_by_hand_and_its_extremes` confere os dois. A loss
# por sequência pune justamente a especialização por texto que o lote global permite. O DeepSeek-V3
# a usa só como complemento, com $\alpha$ = 1e-4, "para evitar desequilíbrio extremo numa única
# sequência" (seção 2.1.2), e argumenta (seção 4.5.3) que balancear no lote, e não em cada sequência,
# deixa os especialistas se especializarem por domínio; Qiu et al. defendem contar $f_i$ no lote
# global inteiro.
# </details>
#
# **3. Especialistas finos.** Para o modelo da tabela da seção 3 (2 camadas, $C = 64$, vocabulário 96;
# o de caracteres do experimento tem 126), compare 8 × top-2, 32 × top-8 e 32 × top-7 + 1
# compartilhado: largura de cada especialista, parâmetros ativos e totais, número de combinações de
# especialistas por token.
#
# <details><summary>Resposta medida</summary>
#
# | MoE | largura | ativos | totais | combinações |
# |---|---:|---:|---:|---:|
# | denso | 192 (MLP) | 100 672 | 100 672 | 1 |
# | 8 × top-2 | 96 | 101 696 | 322 880 | 28 |
# | 32 × top-8 | 24 | 104 768 | 325 952 | 10 518 300 |
# | 32 × top-7 + 1 compartilhado | 24 | 104 768 | 335 168 | 3 365 856 |
#
# Os ativos só diferem pelo roteador ($2 \times 64 \times E$); os totais quase não mudam (a mesma
# largura total de especialistas), mas as combinações crescem de 28 para milhões. O preço aparece no
# `docs/benchmarks.md`: muitos especialistas estreitos são muitas multiplicações pequenas (no modelo
# do benchmark, 4 camadas e $C = 48$, numa CPU x86_64 com 1 thread: 32 × top-7 + 1 compartilhado
# custa 2,08× o passo do denso, contra 1,40× do top-2).
# </details>
#
# **4. O preço do lote global.** Com acumulação de gradiente, `global_balance_prepass` roda um forward
# a mais, sem gradiente. Meça com `uv run -m scripts.bench_06_routers` quanto um passo de 2
# micro-lotes custa com `moe_balance_scope="global"` e com `"micro_batch"`. Quanto você esperava?
#
# <details><summary>Resposta medida</summary>
#
# Esperado: um forward sem gradiente é ~1/3 de forward + backward, então ~1,33×. Medido (1 thread,
# rodadas alternadas, numa CPU x86_64 de 2 núcleos sem outra carga, o modelo padrão do benchmark: 4 camadas, $C = 48$):
# 159,4 ms contra 123,7 ms, 1,29×. Com um micro-lote por passo (a base do experimento) não há
# pré-passagem: o passo soma as contagens entre os processos depois do forward, e o custo é o do
# top-2; o par
# "micro-lotes de 4" / "lote global" da grade paga a pré-passagem (os tokens/s da grade, medidos sob
# carga, são ruidosos demais para confirmar o 1,29×).
# </details>
#
# **5. Quantas sementes?** Com o desvio-padrão da loss do denso entre sementes da grade registrada
# ($\sigma$), quantas sementes por variante seriam necessárias para que o erro-padrão de uma média de
# Δ, $\sigma\sqrt{2/n}$ (duas médias de $n$ sementes cada, sem parear), ficasse abaixo de 0,005
# nats, em cada regime?
#
# <details><summary>Resposta medida</summary>
#
# Da grade: $\sigma$ = 0,0403 nats com caracteres e 0,1171 com BPE (o denso, sementes 0 a 9).
# $\sigma\sqrt{2/n} < 0{,}005$ pede $n > 2(\sigma/0{,}005)^2$: 130 sementes com caracteres e 1 097
# com BPE. Com as 10 sementes da grade, o erro-padrão de um Δ sem parear é 0,018 (caracteres) e
# 0,052 (BPE). Parear pela semente (o mesmo início e os mesmos lotes para a base e a variante)
# ajuda quando a variante muda pouco o treino — com BPE, o desvio dos Δ pareados de todas as chaves
# (0,0249 a 0,0745) fica bem abaixo do desvio do próprio denso; quando a variante (ou a base) muda o
# momento em que o modelo sai do platô, não ajuda (exercício 6): com caracteres, o desvio dos Δ
# pareados entre sementes vai de 0,1238 a 0,2260, mais que o do próprio denso.
# </details>
#
# **6. O platô dos caracteres.** Em `docs/results/06/one_switch.json`, ache para cada treino com
# caracteres o primeiro passo em que a loss de validação cai abaixo de 2,9 (os modelos passam um
# tempo num platô perto de 3,1, a loss de quem só aprendeu a frequência de cada caractere) e
# compare com a loss final. O que isso diz sobre as diferenças da tabela com caracteres?
#
# <details><summary>Resposta medida</summary>
#
# ```python
# res = json.loads(Path("docs/results/06/one_switch.json").read_text(encoding="utf-8"))
# for r in res["runs"]:
#     escape = next((h["step"] for h in r["history"] if h["val_loss"] < 2.9), None)
#     print(r["name"], r["seed"], escape, round(r["val"]["mean"], 4))
# ```
#
# Dos 110 treinos com caracteres, 83 saem do platô até o passo 90 (10 no passo 60, 73 no 90) e
# terminam entre 2,2006 e 2,3537; 14 saem no passo 120 e terminam entre 2,2701 e 2,3931; os outros
# 13 saem do passo 150 em diante (ou nunca) e terminam entre 2,4389 e 2,9676 — entre eles a própria
# **base** da semente 4 (passo 240, loss 2,7155) e a sigmoide da semente 0, que nunca sai (2,9676).
# A base presa deixa muito negativo o Δ da semente 4 das variantes que saíram cedo, mas não o da
# sigmoide, da loss por sequência, dos micro-lotes de 4 e do lote global, que nessa semente também
# só saem entre os passos 180 e 300. A loss final com caracteres, neste orçamento, mede sobretudo
# **quando** o treino saiu do platô, e isso varia com a semente mais do que com a chave: um Δ grande
# numa semente e pequeno noutra é isso, não um efeito da chave.
# </details>
#
# ## O que você aprendeu
#
# - O roteador **sigmoide** do DeepSeek-V3 dá afinidades independentes; as portas são os escores dos
#   $k$ escolhidos renormalizados (vezes o *routed scaling factor*, que vem da configuração
#   publicada, não das equações), e o viés de balanceamento **só escolhe**: nem pesa as portas nem
#   entra na contagem $f_i$ da loss de balanceamento (eq. 16–18). O pacote conta $f_i$ sem o viés em
#   todos os escopos, e um teste reproduz a eq. 18 à mão num lote em que o viés muda escolhas.
# - **Onde** se conta $f_i$ muda a loss: micro-lote, sequência (DeepSeek-V3) ou lote global (Qwen).
#   Global exige somar as **contagens** de todos os micro-lotes e processos **antes** da loss;
#   com acumulação, uma pré-passagem sem gradiente faz isso exatamente (2 micro-lotes = 1 lote,
#   2 processos = 1 processo, nos testes).
# - **Medir uma chave de cada vez** exige saber o tamanho do ruído. Aqui a estimativa da loss (131 072
#   tokens) tem erro-padrão de 0,0035–0,0050 nats e uma diferença pareada ~0,001; o que domina é a
#   **semente**: o mesmo denso varia 0,0403 nats com caracteres e 0,1171 com BPE. Um efeito só é
#   mensurável quando o intervalo de 95% da média sobre as sementes deixa o zero de fora.
# - **Uma chave de cada vez**, 0,61 M tokens, 10 sementes: com caracteres, **nada** é mensurável — o
#   momento em que cada treino sai do platô (até a base da semente 4 ficou presa até o passo 240) pesa
#   mais que a chave; a receita DeepSeek-V3, que com 3 sementes parecia melhor (−0,055 ± 0,019),
#   ficou em −0,0705 ± 0,1589, nenhuma diferença mensurável. Com BPE, os finos 32×top-8 são
#   mensuravelmente piores (+0,0874 ± 0,0711, intervalo +0,0365 a +0,1382) e a receita V3 também,
#   por pouco (+0,0536 ± 0,0704, intervalo +0,0032 a +0,1040); a 1ª camada densa fica acima da base
#   em 9 de 10 sementes, mas sem diferença mensurável (o intervalo contém o zero); o resto, nenhuma
#   diferença mensurável. Até o MoE contra o denso muda de sinal de uma semente para outra nos dois
#   regimes. Mais sementes mudaram a conclusão tirada de 3: uma semente que destoa das outras (como a
#   4, com caracteres) é um dado, não uma exceção a descartar, e 10 sementes de modelos de 100 a 160
#   mil parâmetros ativos ainda dão indícios, não leis.
# - **Lote global contra micro-lote**: nenhuma diferença mensurável na loss, e nenhum ganho
#   mensurável de especialização nesta escala (16 sequências contra 4 por micro-lote); o único
#   sinal que deixa o zero de fora (pelo token, BPE, camada 0, no limite) vai no sentido contrário
#   ao do artigo.
# - Para ler um MoE, **olhe o roteamento**: coativação (pares de especialistas que andam juntos),
#   especialização por classe e posição, e a saturação ao longo do treino — que depende da
#   definição: a sobreposição média do OLMoE chega a 50% bem antes do conjunto exato.
