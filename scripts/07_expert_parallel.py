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
# # Capítulo 07 — MoE em várias GPUs: paralelismo de especialistas
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sagui-nlp/nanomoe/blob/main/notebooks/07_expert_parallel.ipynb)
#
# No capítulo 04 replicamos o modelo inteiro em cada processo (DDP): cada GPU guarda **todos** os
# pesos e lê uma fatia diferente dos dados. Um MoE de verdade não cabe assim. O DeepSeek-V3 tem
# 256 especialistas roteados (e 1 compartilhado) por camada MoE e 671 bilhões de parâmetros; cada
# token usa só 37 bilhões. A saída é
# **paralelismo de especialistas** (*expert parallelism*, EP): com $W$ processos (*ranks*), cada um
# guarda só $E/W$ especialistas, e os **tokens viajam** até o rank que tem o especialista escolhido
# e voltam com a resposta.
#
# | ideia | artigo |
# |---|---|
# | especialistas espalhados por dispositivos, `all_to_all` de ida e volta | Lepikhin et al. 2020, [*GShard*][gshard] |
# | top-1, fator de capacidade, o custo de comunicação | Fedus et al. 2021, [*Switch Transformers*][switch] |
# | despacho sem descarte, *kernels* de blocos esparsos | Gale et al. 2022, [*MegaBlocks*][megablocks] |
# | roteamento limitado por nó (§2.1.2); DualPipe (§3.2) | DeepSeek-AI 2024, [*DeepSeek-V3*][dsv3] |
#
# [gshard]: https://arxiv.org/abs/2006.16668
# [switch]: https://arxiv.org/abs/2101.03961
# [megablocks]: https://arxiv.org/abs/2211.15841
# [dsv3]: https://arxiv.org/abs/2412.19437
#
# Testar isso costuma exigir um cluster. Aqui não: as operações coletivas de que o EP precisa
# (`all_to_all_single`, `all_reduce`, `all_gather`) rodam na CPU com o backend **gloo** do
# `torch.distributed`. Este notebook lança os processos para você (com `torchrun`, num
# subprocesso) e prova, número a número, que $W$ ranks calculam **o mesmo** que um processo só.
# O código mora em `nanomoe/parallel/expert_parallel.py` (a camada) e `nanomoe/parallel/strategy.py`
# (a estratégia `parallel="ep"` do laço de treino único do capítulo 04, `nanomoe.training.train`: o mesmo
# `scripts.04_train` treina um MoE com EP, com a config `machado_moe_ep`); `nanomoe/course/ep_runs.py`
# tem as ferramentas do capítulo (lançar o `torchrun`, resumir um treino, conferir uma camada); os
# testes estão em `tests/test_07_expert_parallel.py` e `tests/test_07_one_loop.py`.
#
# ```bash
# uv run -m scripts.07_expert_parallel                                    # este capítulo, na CPU
# torchrun --standalone --nproc_per_node=2 -m scripts.04_train --config=machado_moe_ep   # um treino EP, 2 processos
# torchrun --standalone --nproc_per_node=2 -m nanomoe.course.ep_runs      # uma camada EP contra 1 processo
# ```

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

device = setup("07", written_for=NANOMOE_REF)  # 'cuda', 'mps' or 'cpu'

# %%
import shutil
import time

import matplotlib.pyplot as plt
import torch

from nanomoe import moe_config
from nanomoe.course.ep_plots import plot_comm, plot_dispatch
from nanomoe.course.ep_runs import format_step, launch, read_metrics, summarize
from nanomoe.course.notebook import show_source
from nanomoe.course.plots import save_figure
from nanomoe.data import read_corpus
from nanomoe.moe import MoE, expert_mlp
from nanomoe.parallel.expert_parallel import (
    AllToAllDispatcher,
    ExpertParallelError,
    check_world_size,
    clip_grad_norm,
    sync_gradients,
)
from nanomoe.paths import in_home
from nanomoe.training.checkpoint import CheckpointError, check_config, load_checkpoint, save_checkpoint
from nanomoe.training.cli import parse_args

# %% [markdown]
# ## Parâmetros
#
# Um MoE pequeno por caractere (2 camadas, 64 dimensões, 8 especialistas, top-2) treinado no
# Machado de Assis com $W$ = 1, 2 e 4 processos e **o mesmo lote global** por passo: 4
# micro-lotes de 8 sequências de 64 caracteres (com $W$ = 1, 4 micro-passos de acumulação; com
# $W$ = 2, 2 micro-passos por rank; com $W$ = 4, 1). Como script:
# `uv run -m scripts.07_expert_parallel --steps=300`; num notebook, edite o dicionário ou defina
# `NANOMOE_ARGS="--steps=300"`. `--quick` roda tudo em segundos (é o que os testes usam).

# %%
DEFAULTS = dict(
    quick=False,
    corpus="machado",
    n_layer=2,
    n_head=4,
    n_embd=64,
    block_size=64,
    n_experts=8,
    moe_top_k=2,
    batch_size=8,  # sequences per micro-batch
    micro_batches=4,  # micro-batches per optimizer step, over all ranks (the global batch)
    steps=100,
    ex_steps=50,  # steps of each exercise run (0 = skip them)
    lr=2e-3,
    warmup_steps=15,
    worlds="1,2,4",  # numbers of processes to compare
    checks="2:0,4:1",  # layer checks W:capacity_factor (0 = dropless)
    out_dir="runs/07",
)
QUICK = dict(n_layer=1, n_embd=32, block_size=32, batch_size=4, steps=4, ex_steps=0, warmup_steps=1, worlds="1,2",
             checks="2:1")
args = parse_args(DEFAULTS, quick=QUICK)
out_dir = in_home(args.out_dir)
out_dir.mkdir(parents=True, exist_ok=True)
worlds = [int(w) for w in args.worlds.split(",")]
model_opts = dict(dataset=args.corpus, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                  block_size=args.block_size, n_experts=args.n_experts, moe_top_k=args.moe_top_k,
                  batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.warmup_steps,
                  moe_balance_scope="micro_batch",  # see section 5
                  betas=(0.9, 0.95),  # AdamW's (GPT.configure_optimizers' default; machado_moe_ep has 0.99)
                  log_interval=1, eval_iters=4, sample_tokens=0)  # a record every step; eval_iters: a multiple of W
text = read_corpus(args.corpus)  # read (or download) once, before the ranks start
print(f"{args.corpus}: {len(text):,} caracteres")
t_start = time.perf_counter()
print(args)

# %% [markdown]
# ## 1. A ideia: os tokens viajam, os especialistas ficam
#
# Numa camada MoE com $E$ especialistas e $W$ ranks ($W$ divide $E$), o rank $r$ guarda os
# especialistas $rE/W, \dots, (r+1)E/W - 1$: uma **fatia** dos pesos empilhados `c_fc` $(E, C, 2H)$
# e `c_proj` $(E, H, C)$ do capítulo 03. O resto do modelo (embeddings, atenção, normas e o
# **roteador**) é replicado, como no DDP. Cada rank, para os **seus** tokens:
#
# 1. **roteia**: escolhe os $k$ especialistas de cada token e decide a capacidade (quem é
#    descartado) **antes** de qualquer viagem, por sequência, como no capítulo 03;
# 2. **ordena** as atribuições (token, especialista) por especialista; como o especialista $e$
#    mora no rank $\lfloor e/(E/W) \rfloor$, as linhas de cada rank de destino ficam contíguas;
# 3. **troca as contagens** com um `all_to_all` de $E$ números: cada rank descobre quantas linhas
#    vai receber de cada um, para cada especialista seu (o tamanho do buffer vem daí);
# 4. **despacha** as linhas com um `all_to_all` (cada rank manda um bloco a cada rank);
# 5. **calcula** os seus especialistas com o mesmo *kernel* de um processo só (`grouped_mm`);
# 6. **devolve** os resultados com outro `all_to_all`, na ordem em que chegaram, e cada rank
#    multiplica pelas portas e soma nos seus tokens, **na ordem original** dos tokens.
#
# O desenho abaixo é um roteamento de verdade: 2 ranks com 6 tokens cada, 4 especialistas, top-2,
# escolhidos por um roteador recém-inicializado.

# %%
torch.manual_seed(0)
demo = MoE(moe_config(n_embd=32, n_head=2, n_experts=4, moe_top_k=2, dropout=0.0))
with torch.no_grad():
    _, _, demo_topk, _ = demo.route(torch.randn(2, 6, 32))  # (W=2 ranks, 6 tokens, k=2)
fig = plot_dispatch(demo_topk, n_experts=4,
                    title="Despacho EP: 2 ranks, 4 especialistas (2 por rank), top-2 (roteador aleatório)")
save_figure(fig, out_dir / "dispatch.png")
plt.show()
crossing = (demo_topk // 2 != torch.arange(2)[:, None, None]).float().mean()
print(f"atribuições que cruzam de rank: {crossing:.0%} (com roteamento uniforme, esperaríamos 1 - 1/W = 50%)")

# %% [markdown]
# As setas vermelhas passam pela rede (ou pelo NVLink, numa máquina com GPUs); as cinzas ficam no
# próprio rank e são só uma cópia. Com $W$ ranks e roteamento equilibrado, uma fração
# $1 - 1/W$ das atribuições viaja — e viaja **duas vezes** (ida e volta), e mais duas no
# *backward*.

# %% [markdown]
# ## 2. Construa: o despacho com listas no lugar da rede
#
# Antes de usar `torch.distributed`, simulamos $W$ ranks num processo só: `sends[s][d]` são as
# linhas que o rank `s` manda ao rank `d`, e "fazer o `all_to_all`" é só ler a matriz pela
# coluna. Tudo o que importa está aqui: ordenar por especialista, cortar por rank de destino,
# calcular no dono, devolver na ordem de envio e somar com as portas na ordem original.

# %%
def ep_forward_simulated(layer: MoE, x: torch.Tensor, W: int) -> torch.Tensor:
    """Dropless expert parallelism with W simulated ranks: x (B, T, C), rank r takes B/W sequences."""
    B, T, C = x.shape
    E, k = layer.n_experts, layer.top_k
    L, b = E // W, B // W  # experts per rank, sequences per rank
    sends, plans = [], []
    for r in range(W):  # 1-2. every rank routes its own tokens and sorts them by expert
        xr = x[r * b:(r + 1) * b]
        _, _, topk_idx, gates = layer.route(xr)
        expert_of = topk_idx.reshape(-1)  # (N*k,)
        token_of = torch.arange(expert_of.numel()) // k
        order = torch.argsort(expert_of, stable=True)
        rows, experts = xr.reshape(-1, C)[token_of[order]], expert_of[order]
        dest = experts // L  # the rank that owns each row's expert
        sends.append([(rows[dest == d], experts[dest == d]) for d in range(W)])
        plans.append((token_of[order], gates.reshape(-1)[order]))
    results = [[None] * W for _ in range(W)]
    for d in range(W):  # 3-5. rank d receives sends[s][d] from every s and runs its experts
        for s in range(W):
            rows, experts = sends[s][d]
            out = torch.zeros_like(rows)
            for e in experts.unique().tolist():
                m = experts == e
                out[m] = expert_mlp(rows[m], layer.experts.c_fc[e], layer.experts.c_proj[e], layer.kind)
            results[s][d] = out  # 6. ... and sends it back to s
    ys = []
    for r in range(W):  # 6. rank r reads the answers in the order it sent them: rank 0's block first
        token_sorted, gates_sorted = plans[r]
        back = torch.cat(results[r])  # (N*k, C)
        y = torch.zeros(b * T, C).index_add_(0, token_sorted, back * gates_sorted[:, None])
        ys.append(y.view(b, T, C))
    return torch.cat(ys)


torch.manual_seed(1)
layer = MoE(moe_config(n_embd=32, n_head=2, n_experts=8, moe_top_k=2, dropout=0.0))
x = torch.randn(4, 16, 32)
with torch.no_grad():
    y_package, _, _ = layer(x)
    for W in (1, 2, 4):
        y_sim = ep_forward_simulated(layer, x, W)
        torch.testing.assert_close(y_sim, y_package, atol=1e-6, rtol=1e-5)
        print(f"W={W}: despacho simulado == MoE do pacote (1 processo); max |diferença| = "
              f"{(y_sim - y_package).abs().max():.1e}")

# %% [markdown]
# ## 3. O mesmo com `torch.distributed`
#
# No pacote, cada rank é um processo. A camada é o mesmo `MoE` do capítulo 03 (roteamento,
# capacidade, losses auxiliares e estatísticas), com outro despachante: `MoE.forward` lê
# rotear → despachar → especialistas → combinar, e o `AllToAllDispatcher` troca só o despacho.
# Repare nas duas trocas de dados: primeiro as **contagens** (`recv` diz quantas linhas chegam de
# cada rank para cada especialista local; é daí que sai o tamanho dos buffers), depois as linhas.
# A ordem das contagens é a mesma das linhas: ambas seguem os especialistas em ordem crescente.

# %%
show_source(AllToAllDispatcher.dispatch, AllToAllDispatcher.combine)

# %% [markdown]
# O `all_to_all` precisa de gradiente: no *backward*, o gradiente de cada linha recebida volta ao
# rank que a enviou — é o mesmo `all_to_all` com os tamanhos trocados. É isso que a função
# autograd `AllToAll` do pacote faz (o PyTorch também oferece uma versão em
# `torch.distributed._functional_collectives`).
#
# Agora, de verdade: `python -m nanomoe.course.ep_runs` sob `torchrun` constrói a mesma camada
# (mesma semente) em cada rank, dá a cada um uma fatia das sequências, roda *forward* e
# *backward* e compara com a camada inteira num processo só. As diferenças vêm apenas da ordem das
# somas em ponto flutuante.

# %%
check_opts = dict(n_embd=args.n_embd, n_head=args.n_head, n_experts=args.n_experts, moe_top_k=args.moe_top_k,
                  block_size=args.block_size)
for item in args.checks.split(","):
    W, cf = int(item.split(":")[0]), float(item.split(":")[1])
    out = launch(W, module="nanomoe.course.ep_runs", moe_capacity_factor=cf, **check_opts)
    print(f"--- {'sem descarte' if cf == 0 else f'capacidade {cf:g}'}\n{out}")

# %% [markdown]
# ## 4. Gradientes: quem soma o quê
#
# Depois do *backward* de cada rank:
#
# - os parâmetros **densos** (replicados) têm gradientes diferentes em cada rank, um por fatia
#   de dados: tiramos a **média** entre os ranks com um `all_reduce`, uma vez por passo (com
#   acumulação, só depois do último micro-lote — como o `no_sync` do DDP no capítulo 04);
# - os parâmetros dos **especialistas** não são somados entre ranks: cada rank tem especialistas
#   **diferentes**, e o gradiente dos tokens de todos os ranks já chegou pelo `all_to_all` do
#   *backward*. Falta só o mesmo $1/W$ que a média dá aos densos. Somar as fatias de ranks
#   diferentes (embrulhar os especialistas num DDP) misturaria especialistas distintos.
#
# O corte do gradiente (*clipping*) usa a norma **global**: os densos contam uma vez (são iguais em
# todo rank), as fatias de especialistas somam seus quadrados entre ranks. Cortar cada rank pela
# própria norma daria escalas diferentes em cada fatia.

# %%
show_source(sync_gradients, clip_grad_norm)

# %% [markdown]
# A **loss de balanceamento** também precisa ver a carga global. $N\sum_i f_i P_i$ não é linear:
# a média das losses de cada rank não é a loss do lote inteiro. Com `moe_balance_scope="global"`
# (capítulo 06), as contagens $f_i$ são somadas entre os ranks (e entre os micro-lotes do passo)
# **antes** da loss; cada rank usa o seu $P_i$ local, e a média entre ranks dá exatamente a
# loss do lote global. O teste `test_layer_outputs_and_gradients_equal_one_process` verifica isso
# com $W$ = 2 e 4.

# %% [markdown]
# ## 5. Treinar com 1, 2 e 4 processos
#
# O `BatchLoader` dá ao rank $r$ os lotes globais $r, r+W, r+2W, \dots$. Então $W$ ranks com
# $A$ micro-passos leem **exatamente** o que 1 processo com $W\cdot A$ micro-passos lê, e os dois
# treinos são a mesma conta (o teste `test_20_steps_on_2_ranks_equal_1_process_with_2_micro_steps`
# compara 20 passos, com e sem capacidade e com um especialista que não recebe nenhum token). Aqui
# treinamos o mesmo modelo com $W$ = 1, 2 e 4, sempre com 4 micro-lotes por passo.
#
# Nestes treinos a loss de balanceamento é **por micro-lote** (a do capítulo 03; em EP, cada rank
# conta os seus tokens), para que os três custem o mesmo: com `moe_balance_scope="global"` (o
# padrão da config `machado_moe_ep`) e acumulação, cada passo paga antes uma passada extra só de
# roteamento (capítulo 06), e com $W$ = 4 (1 micro-lote por rank) não — a comparação de velocidade
# ficaria torta. A versão global foi verificada na seção 3.

# %%
runs, logs = {}, {}
for W in worlds:
    t0 = time.perf_counter()
    # grad_accum counts the micro-batches of a step over all processes: W ranks take grad_accum / W each
    launch(W, max_steps=args.steps, grad_accum=args.micro_batches, eval_interval=args.steps,
           out_dir=out_dir / f"w{W}", **model_opts)
    runs[W] = summarize(out_dir / f"w{W}")
    runs[W]["wall_s"] = time.perf_counter() - t0
    logs[W] = read_metrics(out_dir / f"w{W}")  # one train record per step
    print(f"=== W={W} ({runs[W]['wall_s']:.0f} s)\n{format_step(logs[W][-1])}\n")

# %%
fig, ax = plt.subplots(figsize=(7, 3.5))
for (W, log), ls in zip(logs.items(), ("-", "--", ":")):
    ax.plot([r["step"] for r in log], [r["ce"] for r in log], label=f"W={W}", lw=1.2, ls=ls)
ax.set(xlabel="passo", ylabel="loss de treino (entropia cruzada)",
       title="MoE 8x top-2 no Machado: 1, 2 e 4 processos, mesmo lote global (CPU, gloo)")
ax.legend()
save_figure(fig, out_dir / "losses.png")
plt.show()
base = logs[worlds[0]]
for W in worlds[1:]:
    gap = max(abs(a["ce"] - b["ce"]) for a, b in zip(base, logs[W]))
    print(f"W={W} vs W={worlds[0]}: max |diferença de loss| em {len(base)} passos = {gap:.1e}")
print("\n| W | tokens/s (mediana, 2ª metade) | bytes pela rede por passo | desequilíbrio médio | loss de validação |")
print("|---|---|---|---|---|")
for W, s in runs.items():
    mb = f"{s['bytes_per_step'] / 1e6:.2f} MB" if "bytes_per_step" in s else "0 (1 processo)"
    imb = f"{s['imbalance_mean']:.3f}" if "imbalance_mean" in s else "-"
    print(f"| {W} | {s['tok_per_s']:.0f} | {mb} | {imb} | {s['val_loss']:.4f} |")

# %% [markdown]
# **Um controle.** As curvas acima se separam depois de algumas dezenas de passos. Para saber se é o
# algoritmo ou o arredondamento, treinamos de novo com 1 processo, partindo dos mesmos pesos
# iniciais com cada um multiplicado por 1 + 1e-7·ε (ε sorteado de uma normal): uma diferença do
# tamanho do último algarismo do float32, sem EP nenhum. A figura mostra, em escala log, a diferença
# de loss para o treino de 1 processo, passo a passo.

# %%
ctrl = out_dir / "w1_perturbed"
launch(1, **{**model_opts, "max_steps": 0, "eval_iters": 0, "out_dir": ctrl / "init"})  # the step-0 checkpoint
ckpt = load_checkpoint(ctrl / "init" / "latest.pt")
gen = torch.Generator().manual_seed(0)
for t in ckpt["model"].values():  # every weight times (1 + 1e-7 noise): float32's last digit
    if t.is_floating_point():
        t.mul_(1 + 1e-7 * torch.randn(t.shape, generator=gen))
save_checkpoint(ctrl / "init.pt", ckpt)
launch(1, init_from=ctrl / "init.pt", max_steps=args.steps, grad_accum=args.micro_batches, eval_interval=args.steps,
       out_dir=ctrl, **model_opts)
curves = {f"W={W}": logs[W] for W in worlds[1:]}
curves["W=1, pesos × (1 + 1e-7 ε)"] = read_metrics(ctrl)
fig, ax = plt.subplots(figsize=(7, 3.5))
for (name, log), ls in zip(curves.items(), ("-", "--", ":")):
    gaps = [abs(a["ce"] - b["ce"]) for a, b in zip(logs[worlds[0]], log)]
    ax.semilogy(range(1, len(gaps) + 1), [max(g, 1e-9) for g in gaps], lw=1.2, ls=ls, label=name)
    same = next((i for i, g in enumerate(gaps) if g > 0), len(gaps))
    print(f"{name}: |ΔL| = 0 até o passo {same}; máximo {max(gaps):.1e}; no último passo {gaps[-1]:.1e}")
ax.set(xlabel="passo", ylabel="|ΔL| para W=1 (0 desenhado em 1e-9)",
       title="Diferença de loss para o treino de 1 processo (escala log)")
ax.legend()
save_figure(fig, out_dir / "loss_gaps.png")
plt.show()

# %% [markdown]
# **Como ler.** Na execução gravada (CPU x86_64 de 2 núcleos compartilhada com outros processos,
# 3,3 min para os treinos e medidas do notebook), os treinos com $W$ = 2, com $W$ = 4 e o controle
# dão exatamente a loss do treino de 1 processo nos primeiros 4, 10 e 6 passos; depois, na figura
# de |ΔL|, as diferenças ficam no último algarismo do float32 (~1e-7) até umas três dezenas de
# passos e então saltam para centésimos de nat. Os máximos impressos acima: 4,6e-2 com $W$ = 2,
# 3,0e-2 com $W$ = 4 e 2,3e-2 no controle, que não tem EP nenhum, só os pesos iniciais mudados no
# último algarismo do float32. O arredondamento sozinho, portanto, já separa dois treinos até
# centésimos de nat. Nesta execução as duas curvas de EP terminam acima da do controle (no último
# passo, 2,9e-2 e 3,4e-3 contra 7,6e-4), mas os máximos ficam na mesma ordem de grandeza, e uma
# execução de cada, com um só sorteio de ε, não separa o efeito do EP do efeito do arredondamento.
# O que mostra que o algoritmo é o mesmo são os primeiros passos idênticos e o teste: com $W$ ranks
# a conta é a mesma, mas os gradientes são somados em outra ordem, e isso muda o último algarismo;
# o treino amplifica essa diferença — um token cujos dois melhores especialistas têm quase o mesmo
# escore troca de especialista, e daí em diante os treinos fazem contas diferentes. Duas GPUs com
# *kernels* não determinísticos fazem o mesmo. A igualdade passo a passo é o que o teste verifica
# em 20 passos (diferença máxima de loss 2,4e-7).
#
# **A velocidade.** Os tokens/s da tabela (a mediana da segunda metade de cada treino, uma execução
# por $W$) foram medidos na mesma CPU x86_64 de 2 núcleos, compartilhada com outros processos. Com
# $W$ = 1 o treino fez 35 088 tokens/s; com $W$ = 2, 17 825 (cerca de metade); com $W$ = 4,
# 20 320 (cerca de 58%): 2 ou 4 processos dividem os mesmos 2 núcleos e ainda pagam as trocas de
# dados e a espera pelo rank mais carregado. Entre $W$ = 2 e $W$ = 4, uma execução de cada não diz
# qual é mais rápido: 4 processos em 2 núcleos ficam à mercê do agendador do sistema operacional, e
# a mediana mede sobretudo isso (em `docs/benchmarks.md`, outra medida, com a máquina mais
# carregada, pôs $W$ = 4 à frente até de $W$ = 1). Numa CPU, mais processos não trazem mais
# núcleos. O paralelismo de especialistas existe para **caber** (cada GPU guarda $E/W$ dos
# especialistas) e para somar a memória e a banda de várias GPUs; na CPU medimos a correção e o
# tráfego, não o ganho de tempo.

# %% [markdown]
# ## 6. A contabilidade: quem manda quanto para quem
#
# A cada passo, cada rank registra as linhas que mandou para cada rank, as linhas que seus
# especialistas calcularam e os bytes que mandou pela rede (ida e volta, *forward* e *backward*;
# as linhas que ficam no próprio rank não contam). O **desequilíbrio** é o máximo sobre a média das
# linhas calculadas por rank: o rank mais carregado dita o ritmo de todos, porque o `all_to_all`
# de volta espera por ele.

# %%
for W in worlds[1:]:
    fig = plot_comm(logs[W])
    save_figure(fig, out_dir / f"comm_w{W}.png")
    plt.show()

# %% [markdown]
# ## 7. Checkpoints que mudam de número de processos
#
# O checkpoint guarda os especialistas **inteiros**: antes de salvar, `full_state_dict` junta as
# fatias de todos os ranks (`all_gather`), e o mesmo para os momentos do AdamW. O arquivo tem o
# formato de um treino de 1 processo. Ao carregar, cada rank fica com a sua fatia. Então um treino
# salvo com 2 ranks continua em 1 processo, e volta para 2 — ou começa de um checkpoint de 1
# processo. Abaixo: o treino de 2 ranks continua em 1 processo (com 4 micro-passos, o mesmo lote
# global) e depois em 2 ranks de novo. O teste `test_checkpoint_moves_2_ranks_to_1_process_and_back`
# confere que as losses de cada continuação são as mesmas de um treino sem interrupção.

# %%
move = out_dir / "move"
shutil.rmtree(move, ignore_errors=True)
shutil.copytree(out_dir / "w2", move)  # the 2-rank run, saved at its last step
extra = max(2, args.steps // 5)
for W, until in ((1, args.steps + extra), (2, args.steps + 2 * extra)):
    out = launch(W, resume=True, max_steps=until, grad_accum=args.micro_batches, eval_interval=until, out_dir=move,
                 **model_opts)
    notes, keep = [], False
    for line in out.splitlines():  # what the loop says about the resume (the notes and their indented lines)
        keep = line.startswith(("resuming", "note", "done")) or (keep and line.startswith("  "))
        notes += [line] if keep else []
    print(f"=== continua com W={W} até o passo {until}\n" + "\n".join(notes))
    print(format_step(read_metrics(move)[-1]) + "\n")

# %% [markdown]
# E o que **não** pode: um checkpoint de outra configuração, ou um número de ranks que não divide
# $E$. Cada recusa diz o que difere. Abaixo chamamos, neste processo, as mesmas funções que o
# laço de treino chama ao começar (`scripts.04_train` imprime a mensagem numa linha `error: ...` e sai com
# código 1).

# %%
ckpt = load_checkpoint(move / "latest.pt")
print(f"checkpoint: passo {ckpt['step']}, salvo com {ckpt['world_size']} processo(s); "
      f"c_fc da camada 0: {tuple(ckpt['model']['transformer.h.0.mlp.experts.c_fc'].shape)} (os 8 especialistas)")
for check in (lambda: check_config(ckpt, moe_config(**{**ckpt["config"], "n_experts": 4})),
              lambda: check_world_size(args.n_experts, 3)):
    try:
        check()
    except (CheckpointError, ExpertParallelError) as e:
        print(f"recusado: {e}\n")

# %% [markdown]
# ## 8. Em várias GPUs
#
# O mesmo programa roda em GPUs com o backend **NCCL** (escolhido automaticamente quando há CUDA:
# cada rank pega a GPU `cuda:LOCAL_RANK`). Numa máquina com 8 GPUs:
#
# ```bash
# torchrun --standalone --nproc_per_node=8 -m scripts.04_train --config=machado_moe_ep --dtype=bfloat16 \
#     --n_layer=8 --n_embd=512 --n_head=8 --block_size=256 --n_experts=64 --moe_top_k=4 --batch_size=32
# ```
#
# Em vários nós, troque `--standalone` por `--nnodes=N --rdzv_endpoint=HOST:PORT`. Números de GPU
# deste capítulo: **não medidos ainda** (o curso foi escrito sem GPU). O que esperar, pelo artigo do
# DeepSeek-V3 (§3.2.2, nas GPUs H800 do treino dele): dentro de um nó o NVLink dá 160 GB/s, entre
# nós a InfiniBand 50 GB/s, ~3,2× menos. Por isso o DeepSeek-V3 manda cada token para no máximo 4
# nós (roteamento limitado por nó, §2.1.2) e sobrepõe o `all_to_all` ao cálculo de outro micro-lote
# (DualPipe, §3.2.1). As folhas de especificação dos fabricantes dão números maiores (900 GB/s de
# NVLink para a H100 SXM): a soma de todos os links nos dois sentidos, não a banda que um
# `all_to_all` obtém.

# %% [markdown]
# ## Exercícios
#
# Cada exercício pede uma previsão e um treino curto, que você roda na célula de código logo abaixo
# dele (comece descomentando a linha pronta). A célula a seguir só prepara duas ferramentas:
# `run_exercise` treina 50 passos (`ex_steps`) em 2 ranks com as mudanças que você pedir (mesmo modelo e
# mesma programação da taxa de aprendizado da seção 5) e `window_stats` resume um treino (loss no
# último passo; tráfego, desequilíbrio, descartes e linhas que ficam no rank, na segunda metade).
# As respostas mostram o que medimos com a configuração padrão numa CPU de 2 núcleos compartilhada
# (a tabela inteira em `docs/results/07/exercicios.md`).

# %%
def window_stats(log: list[dict]) -> dict:
    """Loss at the last step; traffic, imbalance, drops and local rows over the second half."""
    tail = log[len(log) // 2:]
    rows = sum(sum(r["received"]) for r in tail)
    return {"loss": log[-1]["ce"], "mb": sum(sum(r["bytes"]) for r in tail) / len(tail) / 1e6,
            "imbalance": sum(r["imbalance"] for r in tail) / len(tail),
            "dropped": sum(r["dropped"] for r in tail) / (rows + sum(r["dropped"] for r in tail)),
            "local": sum(sum(r["sent"][i][i] for i in range(len(r["sent"]))) for r in tail) / rows}


def run_exercise(name: str, steps: int = args.ex_steps or 50, **changes) -> dict:
    """Train `steps` steps on 2 ranks with `changes` (e.g. moe_top_k=1); the window_stats of the run."""
    # same learning-rate schedule as the main runs (decay_steps), so step `steps` compares with theirs
    opts = dict(model_opts, max_steps=steps, decay_steps=args.steps, grad_accum=args.micro_batches,
                eval_interval=steps)
    folder = out_dir / f"ex_{name}"
    launch(2, out_dir=folder, **{**opts, **changes})
    return window_stats(read_metrics(folder))


# %% [markdown]
# **1. Preveja o tráfego.** Com $W$ ranks, $n$ camadas MoE, $S$ tokens por passo, top-$k$ e
# roteamento uniforme, quantos bytes passam pela rede por passo (float32, $C$ dimensões)?
# Compare com o medido para $W$ = 2 e 4 (`runs[W]["bytes_per_step"]`, seção 5).

# %%
# n, S, k, C = args.n_layer, args.micro_batches * args.batch_size * args.block_size, args.moe_top_k, args.n_embd
# print("previsto:", ..., "medido:", {W: runs[W]["bytes_per_step"] for W in worlds[1:]})

# %% [markdown]
# <details><summary>Resposta</summary>
#
# Cada atribuição que sai do rank cruza a rede 4 vezes (ida e volta no *forward*, ida e volta no
# *backward*): $4 \cdot n \cdot S \cdot k \cdot (1 - 1/W) \cdot C \cdot 4$ bytes. Com $n$ = 2,
# $S$ = 4·8·64 = 2048, $k$ = 2, $C$ = 64: 4,19 MB para $W$ = 2 e 6,29 MB para $W$ = 4. A seção 5
# mediu 4,19 MB ($W$ = 2) e 6,29 MB ($W$ = 4) por passo: a previsão acerta porque o roteador, na
# segunda metade do treino, manda metade (um quarto) das linhas para o próprio rank, como faria um
# roteamento uniforme — 50,0% e 25,0% medidos (`runs[W]["local_fraction"]`, registrados em
# `docs/results/07/exercicios.md`). Note
# que o tráfego cresce com $W$: mais ranks, menos linhas ficam em casa ($1/W$).
#
# </details>
#
# **2. Top-1.** Troque para `moe_top_k=1` (Switch) com 2 ranks. O que acontece com os bytes por
# passo e com a loss após o mesmo número de passos?

# %%
# top1 = run_exercise("top1", moe_top_k=1)
# print(top1, window_stats(logs[2][:args.ex_steps or 50]))  # against the top-2 run of section 5, same steps

# %% [markdown]
# <details><summary>Resposta</summary>
#
# Medido no passo 50 (2 ranks, a mesma programação da taxa de aprendizado;
# `docs/results/07/exercicios.md`): com top-1 o tráfego cai pela metade, 2,10 MB contra 4,18 MB por
# passo (cada token viaja para 1 especialista em vez de 2), e o desequilíbrio entre os ranks sobe de
# 1,271 para 1,421: com um só especialista por token a carga oscila mais. A loss ficou em 3,1556
# contra 3,1286 do top-2: 0,027 nat, menos do que a maior diferença entre os treinos de $W$ = 1 e
# $W$ = 2 da seção 5 (4,6e-2), que fazem a mesma conta e só somam em outra ordem. Com 50 passos e
# uma semente, não dá para dizer qual treina melhor.
# Cada especialista top-1 é duas vezes mais largo (mesmos parâmetros ativos), então o cálculo por
# token é o mesmo: o que se economiza é comunicação.
#
# </details>
#
# **3. Capacidade.** Com `moe_capacity_factor=1.0` e 2 ranks, que fração das atribuições é
# descartada, quanto tráfego se economiza e o que acontece com o desequilíbrio?

# %%
# cap = run_exercise("cap1", moe_capacity_factor=1.0)
# print(cap)

# %% [markdown]
# <details><summary>Resposta</summary>
#
# 47,4% das atribuições foram descartadas na segunda metade dos 50 passos. Uma causa grande é o
# tamanho do grupo em que a capacidade é contada: aqui, **cada sequência** de 64 caracteres, com 16
# vagas por especialista ($64 \cdot 2 / 8 \cdot 1{,}0$). Numa sequência tão curta a carga de cada
# especialista flutua muito, e todo excedente é descartado. O Switch e o GShard contam a capacidade
# no lote de cada dispositivo (milhares de tokens), onde as flutuações se compensam e o mesmo fator
# descarta bem menos (não medimos aqui o mesmo fator contado no lote inteiro). Conta também que, em 50
# passos, o roteador ainda está longe do equilíbrio
# (desequilíbrio médio 1,271 no top-2 sem capacidade). O tráfego caiu para 2,20 MB por passo
# (atribuições descartadas não viajam: a capacidade é decidida **antes** do despacho) e o
# desequilíbrio ficou em 1,247 (o teto de vagas corta os picos); a loss do passo 50 (3,1302 contra
# 3,1286) ficou bem dentro da diferença que o arredondamento sozinho produz (seção 5): aqui, em 50
# passos, a perda de qualidade não é mensurável. Em geral, a capacidade troca qualidade (tokens
# descartados) por um limite no tráfego e na espera; sem descarte (MegaBlocks, DeepSeek-V3) é a
# escolha moderna.
#
# </details>
#
# **4. Por que $W$ = 4 não é mais rápido aqui?** Olhe os tokens/s da seção 5.
#
# <details><summary>Resposta</summary>
#
# Na execução gravada ele foi **mais lento**: 20 320 tokens/s contra 35 088 com $W$ = 1 (e
# 17 825 com $W$ = 2). O trabalho de um passo é o mesmo nos três casos, e com $W$ > 1 ainda há as
# trocas de dados (6,29 MB por passo com $W$ = 4) e a espera pelo rank mais carregado (desequilíbrio
# médio 1,182, contra 1,148 com $W$ = 2). Numa CPU de 2 núcleos, 4 processos de 1 thread disputam 2
# núcleos, e os tokens/s medem sobretudo o agendador do sistema operacional (por isso, com uma
# execução de cada, $W$ = 4 à frente de $W$ = 2 não quer dizer nada). O ganho real do EP aparece
# com uma GPU por rank, quando cada uma calcula só $E/W$ dos especialistas.
#
# </details>

# %%
elapsed = time.perf_counter() - t_start
print(f"tempo total dos treinos e medidas deste notebook: {elapsed / 60:.1f} min "
      f"(torch {torch.__version__}, {torch.get_num_threads()} threads no processo do notebook)")

# %% [markdown]
# ## O que você aprendeu
#
# - Paralelismo de especialistas: cada um de $W$ ranks guarda $E/W$ especialistas; o roteador e o
#   resto do modelo são replicados. Os tokens viajam com dois `all_to_all` (ida e volta), e antes
#   deles um `all_to_all` das **contagens**, que dimensiona os buffers.
# - A capacidade é decidida **antes** do despacho, por sequência, no rank do token: assim o destino
#   de um token não depende dos tokens dos outros ranks nem de $W$.
# - Gradientes: média dos densos entre ranks uma vez por passo; os especialistas **não** são
#   somados entre ranks (só o fator $1/W$); corte pela norma global. A loss de balanceamento soma as
#   contagens de todos os ranks antes de multiplicar por $P_i$.
# - A prova: a mesma camada em 2 e 4 ranks dá as mesmas saídas e gradientes que em 1 processo, e 20
#   passos em 2 ranks dão as mesmas losses que 1 processo com 2 micro-passos (a diferença é só a
#   ordem das somas em ponto flutuante).
# - Checkpoints com os especialistas inteiros mudam de número de processos: 2 → 1 → 2 ranks.
# - O custo é tráfego ($\approx 4\,n\,S\,k\,(1-1/W)\,C$ números por passo) e espera pelo rank mais
#   carregado; o ganho é caber e somar GPUs — o que os artigos fazem para esconder esse custo
#   (sobrepor comunicação e cálculo, limitar nós por token) é o próximo passo.
#
# **Para ler.** Lepikhin et al. 2020, [*GShard*](https://arxiv.org/abs/2006.16668); Fedus, Zoph &
# Shazeer 2021, [*Switch Transformers*](https://arxiv.org/abs/2101.03961); Gale et al. 2022,
# [*MegaBlocks*](https://arxiv.org/abs/2211.15841); DeepSeek-AI 2024,
# [*DeepSeek-V3 Technical Report*](https://arxiv.org/abs/2412.19437) (roteamento limitado por nó,
# DualPipe e os *kernels* de `all_to_all`). Os termos do curso estão no
# [glossário](../docs/glossario.md).
