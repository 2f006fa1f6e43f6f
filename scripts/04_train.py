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
# # Capítulo 04 — Treinar de verdade: dados, um script do notebook a várias GPUs, retomada exata
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sagui-nlp/nanomoe/blob/main/notebooks/04_train.ipynb)
#
# Nos capítulos anteriores treinamos modelos pequenos em poucos segundos. Agora o treino fica
# sério: milhões de tokens, minutos ou horas, talvez várias GPUs. Três coisas passam a importar:
#
# 1. **Dados em disco**: o corpus é tokenizado uma vez em *shards* `.npy` (uint16) e lido por
#    *memory map*; o carregador sorteia janelas aleatórias e sabe quantos lotes já entregou.
# 2. **Um laço de treino só**, `nanomoe.training.train.train`, para CPU, uma GPU ou várias com
#    `torchrun`: warmup + decaimento cosseno, *gradient clipping*, acumulação de gradiente,
#    precisão mista escolhida pelo dispositivo (bf16 em Ampere/Hopper, fp16 + `GradScaler` na T4,
#    fp32 na CPU), `torch.compile` opcional, avaliação periódica, amostras de texto, `metrics.jsonl`
#    e gráfico das curvas. (O que cada passo faz está explicado no capítulo 02, seção 8, "O laço
#    de treino".)
# 3. **Nunca perder trabalho**: checkpoints `latest.pt` e `best.pt` escritos de forma atômica,
#    com tudo o que é preciso para **retomar exatamente** (`--resume`): pesos, estado do AdamW,
#    do `GradScaler`, passo, estados dos geradores aleatórios e posição do carregador. Um treino
#    interrompido e retomado dá, na CPU, **as mesmas losses bit a bit** que um treino direto.
#
# O mesmo código é o script `scripts/04_train.py`, pareado com este notebook pelo jupytext:
#
# ```bash
# uv run -m scripts.04_train                                   # Machado, ~6 min numa CPU de 2 núcleos
# uv run -m scripts.04_train --config=shakespeare_char_gpt2    # a receita de CPU do nanoGPT
# uv run -m scripts.04_train --config=machado_moe --max_steps=500
# uv run -m scripts.04_train --resume                          # continua do último checkpoint
# torchrun --standalone --nproc_per_node=2 -m scripts.04_train --config=machado_char_modern  # DDP
# torchrun --standalone --nproc_per_node=2 -m scripts.04_train --config=machado_moe_ep  # EP, cap. 07
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

device = setup("04", written_for=NANOMOE_REF)  # 'cuda', 'mps' or 'cpu'

# %% [markdown]
# ## Parâmetros: um arquivo de configuração + `--chave=valor`
#
# Cada receita é um JSON em `nanomoe/resources/configs/`, instalado com o pacote (só dados, nunca
# código executável; `--config=minha.json` usa a sua): o
# pré-ajuste do modelo (`preset`: `gpt2`, `modern` ou `moe`), qualquer campo de `GPTConfig`
# (`n_layer`, `n_embd`, `n_experts`...), qualquer campo de `TrainConfig` (`max_steps`, `lr`,
# `batch_size`, `grad_accum`...) e os dados (`dataset` + `tokenizer`, ou `data_dir`). A ordem de
# precedência é: padrões < JSON < `--quick` < `--chave=valor` explícito.
#
# | config | o que é |
# |---|---|
# | `machado_char_modern` | **padrão**: modelo moderno (RoPE, RMSNorm, SwiGLU, MQA), Machado por caractere, ~6 min |
# | `shakespeare_char_gpt2` | receita de CPU do nanoGPT (4 camadas × 4 cabeças × 128, bloco 64, lote 12, 2000 passos) |
# | `shakespeare_char_modern` | a mesma receita e os mesmos tokens, com a arquitetura moderna |
# | `machado_moe` | Mixture-of-Experts (8 especialistas, top-2) em Machado |
# | `gpt2_124m_fineweb`, `modern_124m_fineweb`, `moe_124m_fineweb` | 124M no FineWeb-Edu, para GPUs (ver abaixo) |
# | `gpt2_finetune_machado` | ajuste fino do GPT-2 da OpenAI no Machado (`init_from: gpt2`) |
#
# Dados: `--data_dir=PASTA` usa uma pasta preparada por `data/prepare_*.py`; sem ela, o par
# `--dataset` (`machado`, `tinyshakespeare`) + `--tokenizer` (`char`, `gpt2`, `bpe`) é preparado
# na primeira vez em `data/<dataset>_<tokenizer>/`.

# %%
import json
import math
import time
from pathlib import Path

import torch

from nanomoe.config import modern_config
from nanomoe.data import BatchLoader, compare_tokenizers, data_tokenizer, load_meta, load_split
from nanomoe.interop.init_from import init_model
from nanomoe.model import GPT
from nanomoe.parallel.distributed import DistInfo, cleanup_distributed, setup_distributed
from nanomoe.training.accumulation import grad_accum_for
from nanomoe.training.cli import in_notebook, short_errors
from nanomoe.training.runs import (
    model_config_from_args,
    model_fields_set,
    parse_run_args,
    resolve_data_dir,
    run_defaults,
    train_config_from_args,
)
from nanomoe.training.train import TrainConfig, compute_gradients, get_lr, start_run, train, wrap_model

DEFAULTS = {
    **run_defaults(),
    "config": "machado_char_modern",  # a packaged config (nanomoe.resources.config_names()) or a path to a .json
    "out_dir": "runs/04",
    "compare_chars": 500_000,  # characters of Machado used in the tokenizer comparison (0 = skip it)
}
QUICK = dict(  # --quick: a few seconds, for the tests
    max_chars=200_000, n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, grad_accum=1,
    max_steps=20, warmup_steps=5, eval_interval=10, eval_iters=2, log_interval=5, sample_tokens=40,
    out_dir="runs/04_quick", compare_chars=5_000, compile=False,
)
if not in_notebook():
    short_errors()  # a bad path or config prints one clear line, not a traceback
args = parse_run_args(quick=QUICK, defaults=DEFAULTS)
dist_info = setup_distributed(args.device)  # under torchrun: join the process group (gloo on CPU, NCCL on GPU)
main = dist_info.is_main
if main:
    given = {k: v for k, v in vars(args).items() if v != DEFAULTS.get(k) and v is not None}
    print("run parameters (differing from the defaults):", json.dumps(given, ensure_ascii=False, default=str))

# %% [markdown]
# ## Dados
#
# A pasta de dados tem `train_000000.npy`, `val_000000.npy` (tokens uint16) e `meta.json` (qual
# tokenizador, quantos tokens). `load_split` abre os shards como *memory maps*: nada é lido para a
# memória até um lote precisar daqueles bytes, então o mesmo código serve para 5 MB de Machado
# e para os 10 bilhões de tokens do FineWeb-Edu.

# %%
data_dir = resolve_data_dir(args, dist_info)
meta = load_meta(data_dir)
tokenizer = data_tokenizer(data_dir)
train_tokens, val_tokens = load_split(data_dir, "train"), load_split(data_dir, "val")
if main:
    n_train, n_val = sum(len(s) for s in train_tokens), sum(len(s) for s in val_tokens)
    print(f"{data_dir}: tokenizer {meta['tokenizer']['name']} (vocab {tokenizer.vocab_size}), "
          f"{n_train:,} train tokens, {n_val:,} val tokens")

# %% [markdown]
# ## O modelo
#
# `model_config_from_args` parte do *preset* e aplica os campos que a receita define; o tamanho
# do vocabulário vem dos dados. A semente fixa garante o mesmo modelo inicial em todos os
# processos (o DDP ainda copia os pesos do processo 0 para os outros, por garantia).
# `--init_from` diz de onde vêm os pesos: `scratch` (padrão, aleatórios), `resume`, o GPT-2 da
# OpenAI (`gpt2`), uma pasta do Hugging Face ou um checkpoint do nanomoe (`nanomoe.interop.init_from`, mais
# abaixo). `tokens_per_step`, quando a receita o define, fixa os tokens de cada passo e a acumulação
# de gradiente sai dele e do número de processos (`nanomoe.training.accumulation`).

# %%
config = model_config_from_args(args, tokenizer.vocab_size)
torch.manual_seed(args.seed)
model, transfer_report = init_model(args.init_from, config, verbose=main,  # scratch: GPT(config)
                                    explicit=model_fields_set(args))  # sizes not set: a pretrained source's
config = model.config  # the source's architecture when the run set no size of its own
tcfg = train_config_from_args(args)
accum, _ = grad_accum_for(tcfg.batch_size, config.block_size, dist_info.world_size, tcfg.tokens_per_step,
                          tcfg.grad_accum)
tokens_per_step = tcfg.batch_size * config.block_size * accum  # over all processes
if main:
    kind = f"MoE {config.n_experts} experts top-{config.moe_top_k}" if config.n_experts else "dense"
    print(f"preset {args.preset} ({kind}): {config.n_layer} layers, {config.n_head} heads "
          f"({config.kv_heads} kv), n_embd {config.n_embd}, block {config.block_size}, "
          f"{model.num_params() / 1e6:.2f}M params ({model.num_params(active=True) / 1e6:.2f}M active)")
    print(f"{tcfg.max_steps} steps x {tokens_per_step:,} tokens = {tcfg.max_steps * tokens_per_step / 1e6:.2f}M tokens "
          f"(~{tcfg.max_steps * tokens_per_step / max(n_train, 1):.2f} epochs)")

# %% [markdown]
# ## Treinar
#
# O que acontece a cada passo está no docstring de `nanomoe/training/train.py`. Duas escolhas tornam a
# retomada exata: o lote número *g* da corrida é sorteado por um gerador semeado com
# `(seed, g)`, e o gerador do dropout é ressemeado com `(seed, rank, passo)` no início de cada
# passo. Nada depende do que foi sorteado antes, então parar e retomar não muda nada.
#
# A cada `eval_interval` passos: loss de validação (**só a entropia cruzada**: a loss auxiliar
# das MoE não entra, e a perplexidade é `exp(CE)`), uma amostra de texto, uma linha em
# `metrics.jsonl`, o gráfico `curves.png` e os checkpoints. Se a loss virar NaN ou infinito, o
# treino para com uma mensagem clara e o último checkpoint bom fica intacto.
#
# **Precisão mista e `GradScaler`.** Numa GPU o laço calcula em 16 bits sob `torch.autocast` e guarda
# os pesos em fp32. O bf16 tem o mesmo expoente do fp32 e dispensa cuidados. O fp16 (o único
# rápido numa T4) representa no mínimo ~6e-8: gradientes menores que isso viram zero. O
# `GradScaler` multiplica a loss por um fator grande (começa em 2¹⁶ = 65536) antes do `backward`,
# divide os gradientes pelo mesmo fator antes do *clipping* e do passo, e, se aparecer um infinito
# ou NaN, pula aquele passo e reduz o fator (Micikevicius et al. 2017,
# [*Mixed Precision Training*](https://arxiv.org/abs/1710.03740)). Na CPU tudo fica em fp32.
#
# **MFU** (*model FLOPs utilization*, [PaLM](https://arxiv.org/abs/2204.02311), apêndice B): os FLOPs
# que o modelo precisa por token — cerca de 6 por parâmetro ativo no forward + backward, mais a
# atenção (`GPT.flops_per_token`) — vezes os tokens/s medidos, divididos pelo pico de FLOP/s do
# dispositivo. Diz que fração da GPU o treino aproveita. O laço registra o MFU quando conhece o pico
# da GPU (a tabela `PEAK_FLOPS` em `nanomoe/device.py`); na CPU não há pico conhecido, e nas
# execuções registradas deste curso (todas em CPU) ele não aparece: não medido ainda.

# %% [markdown]
# ### A taxa de aprendizado, do zero
#
# `get_lr` é uma função só do passo. Nos primeiros `warmup_steps` passos a taxa sobe em linha reta
# até `lr`: no começo os pesos são aleatórios, os gradientes são grandes e as médias do AdamW ainda
# não se firmaram, e passos grandes ali podem desestabilizar o treino. Depois ela desce em meio
# cosseno até `min_lr` no passo `max_steps` (ou `decay_steps`) e fica lá (Loshchilov & Hutter,
# [*SGDR*](https://arxiv.org/abs/1608.03983)). Por depender só do passo, a retomada e o DDP não
# precisam guardar nada dela. Do zero:

# %%
def my_lr(step: int, c) -> float:
    """c: a TrainConfig. Linear warmup, then cosine decay from lr to min_lr, then min_lr."""
    decay = c.max_steps if c.decay_steps is None else c.decay_steps  # the cosine ends at this step
    if step < c.warmup_steps:  # lr / (w + 1), 2 lr / (w + 1), ..., w lr / (w + 1)
        return c.lr * (step + 1) / (c.warmup_steps + 1)
    if step > decay or decay <= c.warmup_steps:  # past the decay: the floor
        return c.min_lr
    r = (step - c.warmup_steps) / (decay - c.warmup_steps)  # 0 -> 1 along the decay
    return c.min_lr + 0.5 * (1 + math.cos(math.pi * r)) * (c.lr - c.min_lr)


# %%
steps = range(tcfg.max_steps + 50)  # every step of this run's schedule, and a little past its end
assert all(my_lr(s, tcfg) == get_lr(s, tcfg) for s in steps)
if main:
    print(f"igual ao pacote em {len(steps)} passos: lr {my_lr(0, tcfg):.2e} no passo 0, "
          f"{my_lr(tcfg.warmup_steps, tcfg):.2e} no fim do warmup (passo {tcfg.warmup_steps}), "
          f"{my_lr(tcfg.max_steps, tcfg):.2e} no passo {tcfg.max_steps}")

# %%
t0 = time.perf_counter()
result = train(model, train_tokens, val_tokens, tcfg, tokenizer=tokenizer,
               extra_state={"data_dir": str(data_dir), "config_name": args.config})
wall = time.perf_counter() - t0
if main:
    print(f"wall time {wall:.1f} s (training {result.train_time_s:.1f} s; the rest is evaluation, samples, "
          f"checkpoints)")
    if result.stopped:
        print("STOPPED:", result.stopped)
if result.stopped and not in_notebook():
    cleanup_distributed(dist_info)
    raise SystemExit(1)

# %% [markdown]
# ## Curvas e amostras
#
# `out_dir` guarda tudo o que a corrida produziu: `metrics.jsonl` (uma linha por registro de
# treino e por avaliação, acrescentadas ao longo da corrida), `curves.png`, `latest.pt`,
# `best.pt` e, para um BPE treinado, o `tokenizer.json` (o checkpoint aponta para ele).

# %%
if main and result.history:
    from nanomoe.course.plots import plot_curves

    runs = {"treino": [{"step": r["step"], "loss": r["ce"]} for r in result.log],
            "validação": [{"step": r["step"], "loss": r["val_loss"]} for r in result.history if "val_loss" in r]}
    fig = plot_curves(runs, y="loss", title=f"{args.config}: entropia cruzada", figsize=(7, 4))
    if not in_notebook():
        print(f"curves: {Path(tcfg.out_dir) / 'curves.png'}")
    print(f"{'step':>6} {'tokens':>11} {'train':>7} {'val':>7} {'ppl':>7} {'tok/s':>8}")
    for r in result.history:
        tl = f"{r['train_loss']:.4f}" if r.get("train_loss") is not None else "-"
        print(f"{r['step']:>6} {r['tokens']:>11,} {tl:>7} {r.get('val_loss', float('nan')):>7.4f} "
              f"{r.get('val_ppl', float('nan')):>7.2f} {r['tokens_per_s']:>8,.0f}")
    print("\nsample at the last evaluation:\n" + (result.final.get("sample") or "(no tokenizer)"))

# %% [markdown]
# ### A corrida registrada neste notebook
#
# As saídas acima são de uma execução real da configuração padrão (`machado_char_modern`) numa CPU
# x86_64 de 2 núcleos (PyTorch 2.15), com 1 thread (`OMP_NUM_THREADS=1`) e outros processos
# disputando a CPU (carga ~2): numa CPU disputada, 2 threads do PyTorch esperando uma pela outra
# chegaram a ser 10× mais lentas que uma.
#
# | | |
# |---|---|
# | modelo | moderno (RoPE, RMSNorm, SwiGLU, MQA: 4 cabeças de consulta, 1 de k/v), 4 camadas, C = 128, bloco 128 |
# | parâmetros | 721 792 (0,72 milhão) |
# | dados | Machado por caractere (126 símbolos), 4,3 milhões de tokens de treino, 478 mil de validação |
# | treino | 2000 passos × 12 × 128 = 3,07 milhões de tokens (0,71 época), 269 s de treino (~11,4 mil tokens/s) |
# | validação | 4,92 no início (chute uniforme: ln 126 = 4,84), 2,42 no passo 100, 1,64 no 1000, **1,494 no 2000** |
# | perplexidade final | 4,45 |
# | tempo total | 309 s na célula de treino (com avaliações, amostras, checkpoints); 5,3 min no notebook inteiro |
#
# Com 1,5 nat por caractere o modelo já escreve palavras e pontuação de português, diálogos com
# travessão, "CAPÍTULO" e nomes de personagens (Maria, Iaiá, Sofia), mas as frases ainda não fazem
# sentido. A loss de treino e a de validação andam juntas (menos de uma época vista): ainda não há
# sobreajuste, e a validação ainda caía no fim (1,5003 → 1,4939 nos últimos 100 passos): mais passos
# provavelmente ainda ajudariam. As losses ficam também em `docs/benchmarks.md`.

# %% [markdown]
# ## Retomar, interromper, várias GPUs
#
# - `--resume` continua de `out_dir/latest.pt`. O teste `tests/test_04_resume.py` treina 2N passos
#   direto e N + N com retomada, para um modelo denso e um MoE, e exige losses e pesos finais
#   **idênticos bit a bit**. Outro teste mata o processo com `SIGKILL` no meio do treino e no meio
#   da escrita de um checkpoint: o `latest.pt` continua legível e a retomada funciona, porque o
#   checkpoint é escrito num arquivo temporário, sincronizado no disco (`fsync`) e só então
#   renomeado por cima do antigo (`os.replace` é atômico).
# - Os checkpoints são carregados com `torch.load(weights_only=True)`: um pickle pode executar
#   código arbitrário ao ser lido, e este modo só reconstrói tensores e dados simples. Um
#   checkpoint de outra configuração é recusado com a lista dos campos diferentes.
# - `torchrun --standalone --nproc_per_node=N -m scripts.04_train ...` roda N processos com DDP
#   (NCCL nas GPUs, gloo na CPU). `grad_accum` conta os micro-lotes de todos os processos (arredondado
#   para cima até um múltiplo deles; o script diz quantos tokens por passo escolheu): com
#   `grad_accum=8` e 4 GPUs, cada uma faz 2 micro-lotes por passo, e o gradiente só é sincronizado
#   no último (`no_sync` nos outros). Os processos leem lotes disjuntos, e o conjunto de lotes de um
#   passo é o mesmo que um processo só leria com o mesmo `grad_accum`: o teste
#   `tests/test_04_ddp.py` confere que 2 processos na CPU seguem a mesma trajetória de loss que 1
#   processo com 2 micro-lotes. Só o processo 0 escreve logs e checkpoints; decisões de parada
#   usam valores somados entre os processos, então todos decidem igual.
# - **FSDP** (*Fully Sharded Data Parallel*; [Zhao et al. 2023](https://arxiv.org/abs/2304.11277)) é
#   o passo seguinte ao DDP: em vez de cada GPU guardar uma cópia inteira dos pesos, dos gradientes e
#   do estado do AdamW (16 bytes por parâmetro em fp32 + Adam), cada uma guarda 1/N deles e junta os
#   pesos de uma camada só na hora de usá-la (a ideia do ZeRO, [Rajbhandari et al. 2019](https://arxiv.org/abs/1910.02054)).
#   Serve para modelos que não cabem numa GPU. O curso não o implementa: os modelos daqui cabem com
#   folga, e o DDP é mais simples e mais rápido quando cabe.

# %% [markdown]
# ### Acumulação de gradiente, do zero
#
# Um lote grande pode não caber na memória: as ativações guardadas para o backward crescem com o
# número de sequências. A saída é partir o lote em micro-lotes, rodar forward + backward em cada um e
# só então dar o passo do otimizador: o `.grad` do PyTorch **soma** o que cada `backward` calcula.
# Como a loss é a média sobre os tokens do lote, a de cada micro-lote é dividida pelo número de
# micro-lotes, e a soma dá o gradiente do lote inteiro (micro-lotes do mesmo tamanho; a menos de
# arredondamento). Custa tempo, não memória. Num modelo minúsculo (semente e gerador próprios, para
# não mexer no acaso do resto do capítulo): um lote de 4 sequências contra 2 micro-lotes de 2.

# %%
with torch.random.fork_rng(devices=[]):  # a seed of its own; the global RNG is left as it was
    torch.manual_seed(0)
    tiny = GPT(modern_config(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16))
gen = torch.Generator().manual_seed(0)  # a local generator for the data too
x, y = torch.randint(0, 16, (2, 4, 8), generator=gen)  # one batch: 4 sequences of 8 tokens, and targets


def grads(micro_batches, scale: float) -> list[torch.Tensor]:
    """backward of loss * scale on each micro-batch: .grad adds them up."""
    tiny.zero_grad()
    for xb, yb in micro_batches:
        (tiny(xb, yb)[1] * scale).backward()
    return [p.grad.clone() for p in tiny.parameters()]


# %%
full = grads([(x, y)], 1.0)  # the whole batch of 4 at once
micro = grads([(x[:2], y[:2]), (x[2:], y[2:])], 1 / 2)  # 2 micro-batches of 2, each loss / 2
torch.testing.assert_close(micro, full)
if main:
    diff = max((a - f).abs().max().item() for a, f in zip(micro, full))
    print(f"1 lote de 4 = 2 micro-lotes de 2 com loss / 2: os mesmos gradientes nos {len(full)} tensores "
          f"(diferença máxima {diff:.1e}, arredondamento)")

# %% [markdown]
# O laço do pacote faz isso em `compute_gradients`: `loss / run.accum` antes de cada `backward` e,
# sob DDP, `no_sync` em todos os micro-lotes menos o último. Uma corrida de verdade (`start_run`,
# como em `train`) com `batch_size=2`, `grad_accum=2` e sem *clipping* tem de dar o gradiente do lote
# de 4 formado pelos mesmos dois micro-lotes, que um segundo `BatchLoader` com a mesma semente sorteia:

# %%
tokens = torch.randint(0, 16, (200,), generator=gen)  # a tiny corpus
pcfg = TrainConfig(batch_size=2, grad_accum=2, grad_clip=0, device="cpu", seed=0)  # grad_clip=0: raw gradients
run = start_run(tiny, tokens, None, pcfg, DistInfo(), None, None)  # loader and optimizer, as train() builds them
wrap_model(run)
ref = BatchLoader(tokens, 2, 8, seed=0)  # the micro-batches the run's loader will draw
(x0, y0), (x1, y1) = ref.next_batch(), ref.next_batch()
full = grads([(torch.cat([x0, x1]), torch.cat([y0, y1]))], 1.0)  # their 4 sequences as one batch
tiny.zero_grad()
compute_gradients(run, step=0)  # forward + backward over the step's grad_accum micro-batches
torch.testing.assert_close([p.grad for p in tiny.parameters()], full)
if main:
    print("igual ao pacote: compute_gradients com 2 micro-lotes de 2 dá o gradiente do lote de 4")

# %% [markdown]
# ## Na escala do GPT-2: FineWeb-Edu, HellaSwag, ajuste fino e várias máquinas
#
# As mesmas peças treinam o GPT-2 de 124M parâmetros como o
# [nanoGPT](https://github.com/karpathy/nanoGPT) e o [build-nanogpt](https://github.com/karpathy/build-nanogpt)
# o treinam. Quatro receitas vêm com o pacote (os tamanhos saem de `GPT(...).num_params`):
#
# | config | o que é |
# |---|---|
# | `gpt2_124m_fineweb` | GPT-2 124M (12 camadas, 12 cabeças, 768 dims, contexto 1024): 124,48M parâmetros |
# | `modern_124m_fineweb` | a arquitetura moderna (RoPE, RMSNorm, SwiGLU, sem vieses): 123,59M |
# | `moe_124m_fineweb` | 8 especialistas top-2 por camada: **123,66M parâmetros ativos por token**, 293,53M ao todo |
# | `gpt2_finetune_machado` | ajuste fino do GPT-2 da OpenAI (`init_from: gpt2`) no Machado, lr baixo (6e-5) |
#
# As três primeiras seguem a receita do build-nanogpt no FineWeb-Edu (tokenizador do GPT-2): 524 288
# tokens por passo, lr 6e-4 com 715 passos de *warmup* e cosseno até 6e-5 em 19 073 passos (10B
# tokens), bf16, `torch.compile`. O ajuste fino usa o tokenizador do GPT-2 no Machado.
#
# **Tokens por passo, não micro-lotes.** Uma receita é ajustada para um lote medido em tokens
# (0,5M para um modelo de 125M, o GPT-3 Small da tabela 2.1 de [Brown et al. 2020](https://arxiv.org/abs/2005.14165));
# `tokens_per_step` fixa esse número e `nanomoe.training.accumulation` deriva dele e do número de processos
# quantos micro-lotes cada processo acumula: 524 288 = 64 × 1024 × 8 micro-lotes numa GPU, × 1 em
# cada uma de 8 GPUs. O script diz o que escolheu
# (`524,288 tokens/step (from tokens_per_step) = 8 process(es) x 1 micro-batch(es) x 64 x 1024 tokens`);
# um número que não divide termina com uma linha que sugere o `--batch_size` que serve. Sem
# `tokens_per_step`, `grad_accum` é arredondado para cima até um múltiplo do número de processos: por
# isso `torchrun --nproc_per_node=2` roda a receita padrão (com o dobro de tokens por passo, e avisa).
#
# **`--init_from`** (`nanomoe.interop.init_from`): `scratch` (padrão), `resume`, um nome do GPT-2 (`gpt2`,
# `gpt2-medium`, ...), uma pasta do Hugging Face ou um checkpoint do nanomoe. Se a arquitetura da
# receita é a da origem, cada tensor é carregado exatamente (a tabela de posições do GPT-2 é cortada
# para um contexto menor, como no nanoGPT); se não é, a transferência parcial do capítulo 05 copia o
# que tem significado e imprime o relatório do que foi copiado, adaptado, inicializado e descartado.
#
# **HellaSwag** ([Zellers et al. 2019](https://arxiv.org/abs/1905.07830), `nanomoe.interop.hellaswag`) a cada
# avaliação, quando `data/hellaswag/hellaswag_val.jsonl` existe (`uv run -m data.prepare_hellaswag`):
# cada exemplo tem um contexto e quatro continuações; a loss do modelo é medida **só nos tokens da
# continuação**, e a de menor loss média por token é a resposta (`acc_norm`; `acc` usa a loss
# somada, que favorece continuações curtas). O acaso dá 0,25.
#
# ```bash
# uv run -m data.prepare_fineweb && uv run -m data.prepare_hellaswag   # uma vez (~20 GB)
# # 1 GPU (se 64 sequências não couberem na memória: --batch_size=32; a acumulação cresce)
# uv run -m scripts.04_train --config=gpt2_124m_fineweb
# uv run -m scripts.04_train --config=gpt2_finetune_machado
# # 8 GPUs numa máquina
# uv run torchrun --standalone --nproc_per_node=8 -m scripts.04_train --config=gpt2_124m_fineweb
# # 2 máquinas x 8 GPUs: o mesmo comando nas duas, --node_rank=1 na segunda; HOST = endereço da primeira
# uv run torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --rdzv_id=gpt2 --rdzv_backend=c10d \
#     --rdzv_endpoint=HOST:29500 -m scripts.04_train --config=gpt2_124m_fineweb --batch_size=32
# ```
#
# O mesmo vale para `modern_124m_fineweb` e `moe_124m_fineweb`; `gpt2_finetune_machado` em 2
# máquinas usa `--batch_size=4` (os comandos das quatro receitas estão em `docs/benchmarks.md`).
# Entre as máquinas: o mesmo código, a mesma receita e as mesmas opções; os shards no mesmo caminho
# em cada máquina (copiados ou num sistema de arquivos compartilhado); só o processo de rank global 0
# escreve em `out_dir`, então `--resume` em várias máquinas pede `out_dir` compartilhado (sem isso,
# a corrida para com uma mensagem em vez de retomar só numa delas). Cada processo usa a GPU
# `cuda:LOCAL_RANK` da sua máquina; as tarefas do processo 0 usam o `RANK` global.
#
# O que esperar (números publicados, não medidos aqui):
#
# | corrida | tokens | hardware | loss de validação | HellaSwag |
# |---|---|---|---|---|
# | GPT-2 124M da OpenAI | — | — | 3,29 (FineWeb-Edu); 3,12 (OpenWebText) | 0,2955 (`acc_norm`, script do llm.c) |
# | nanoGPT 124M no OpenWebText | ~300B | 8× A100 40GB, ~4 dias | ~2,85 | — |
# | llm.c 124M no FineWeb 10B | 10B | 8× A100 80GB, ~90 min | 3,28 | 0,299 |
# | GPT-3 Small (125M) | 300B | — | — | 0,337 |
# | **este curso, as 4 receitas** | | **não medido ainda** | não medido ainda | não medido ainda |
#
# As linhas deste curso ficam «não medido ainda» até uma GPU rodar as receitas (tokens/s e MFU
# incluídos: o laço os registra sozinho). Fontes: a docstring de `dev/data/hellaswag.py` do llm.c
# (0,2955: o `acc_norm` do GPT-2 124M no script de avaliação do llm.c, estilo completação; o
# `lm-evaluation-harness` dá 0,3114 no estilo múltipla escolha); o `play.ipynb` do build-nanogpt
# (3,2924 de validação e 0,2945 de HellaSwag: a linha de referência do GPT-2 que o build-nanogpt
# desenha, de outra avaliação; 0,337 para o GPT-3) — duas avaliações, dois números para o mesmo
# modelo; o README do nanoGPT, a discussão #481 do llm.c, o README do modded-nanogpt (3,2847 para
# o llm.c); detalhes em `docs/benchmarks.md`.

# %% [markdown]
# ## Quantos tokens por caractere? char, GPT-2 e um BPE treinado no Machado
#
# O tokenizador decide quantos passos o modelo dá para ler um texto. Por caractere, cada letra é
# um token; o BPE do GPT-2 foi treinado em inglês e parte palavras portuguesas (e acentos) em
# muitos pedaços; um BPE byte-level treinado no próprio Machado (4096 tokens) junta os pedaços
# mais frequentes do português. Contamos no trecho de validação (não visto pelo BPE).

# %%
if main and args.compare_chars and not args.data_dir:  # a prepared folder (FineWeb...) is not Machado
    from nanomoe.data import gpt2_tokenizer, read_corpus, train_bpe
    from nanomoe.tokenizer import get_tokenizer

    text = read_corpus("machado")
    cut = int(len(text) * 0.9)
    train_text, sample = text[:cut], text[cut:cut + args.compare_chars]
    bpe_train = train_text[: 20 * args.compare_chars]
    toks = {"char": get_tokenizer("char", text=text), "bytes": get_tokenizer("bytes")}
    try:
        toks["gpt2"] = gpt2_tokenizer()
    except Exception as e:  # offline without the GPT-2 files
        print(f"(GPT-2 BPE unavailable: {type(e).__name__})")
    bpe = train_bpe(bpe_train, 4096)
    toks["bpe (Machado, 4096)"] = bpe
    rows = compare_tokenizers(sample, toks)
    print(f"{len(sample):,} characters of Machado (validation part)")
    print(f"{'tokenizer':<22} {'vocab':>7} {'tokens':>9} {'tokens/char':>12} {'chars/token':>12}")
    for r in rows:
        print(f"{r['tokenizer']:<22} {r['vocab_size']:>7,} {r['tokens']:>9,} {r['tokens_per_char']:>12.3f} "
              f"{r['chars_per_token']:>12.2f}")
    print("exemplo:", [bpe.decode([i]) for i in bpe.encode(sample[:60])])

# %%
if main and args.compare_chars and not args.data_dir:  # a prepared folder (FineWeb...) is not Machado
    import matplotlib.pyplot as plt

    from nanomoe.course.plots import save_figure

    fig_tok, ax = plt.subplots(figsize=(7, 2.6))
    ax.barh([r["tokenizer"] for r in rows], [r["tokens_per_char"] for r in rows], color="C0")
    for i, r in enumerate(rows):
        ax.text(r["tokens_per_char"], i, f" {r['tokens_per_char']:.3f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens por caractere (menos = texto mais curto para o modelo)")
    ax.set_title(f"Tokenizadores em {len(sample):,} caracteres de Machado (validação)".replace(",", "\u202f"))
    ax.set_xlim(0, 1.25)
    save_figure(fig_tok, Path(tcfg.out_dir or ".") / "tokenizers.png")  # shown by the notebook's inline backend

# %% [markdown]
# Menos tokens por caractere significa contexto mais longo no mesmo `block_size` e menos passos
# para ler o corpus, ao preço de um vocabulário maior (embedding e cabeça de saída maiores) e de
# uma loss por token que não se compara diretamente com a loss por caractere: para comparar
# modelos com tokenizadores diferentes, converta para *bits por caractere* (loss × tokens/char ÷ ln 2).

# %% [markdown]
# ## Gerar texto de um checkpoint
#
# O treino deixou `latest.pt` (e `best.pt`) em `out_dir`. Para gerar texto basta apontar para
# ele: `load_model` lê do checkpoint a configuração do modelo **e o tokenizador** (o alfabeto do
# tokenizador por caractere, o `tokenizer.json` do BPE treinado que está ao lado do checkpoint, ou
# o GPT-2), então nada precisa ser repetido à mão. O mesmo `load_model` abre uma pasta exportada
# para o Hugging Face (`nanomoe.interop.hf.export_hf`, capítulo 05) ou baixa o GPT-2 pelo nome (`"gpt2"`).
#
# `generate_text` escreve o texto à medida que os tokens saem (`stream_to=sys.stdout`). Um token
# de um BPE byte-level pode carregar só metade de um caractere UTF-8 (o "ã" são dois bytes); por
# isso o texto é decodificado numa janela dos últimos tokens e só é impresso quando o último
# caractere está completo. No fim, `out.stats` diz o tempo até o primeiro token (o *prefill* do
# prompt inteiro + o primeiro sorteio) e quantos tokens por segundo saíram.
#
# Pelo terminal, o mesmo:
#
# ```bash
# uv run -m scripts.generate runs/04 "Capitu" --temperature 0             # guloso: sempre o mesmo texto
# uv run -m scripts.generate runs/04 "Capitu" --temperature 0.8 --top-k 50 --num-samples 3 --seed 1
# uv run -m scripts.generate runs/04/best.pt "Capitu" --top-p 0.9 --max-new-tokens 100
# uv run -m scripts.generate runs/04 "Capitu" --no-cache                  # sem KV cache (bem mais lento)
# ```
#
# O texto vai para a saída padrão; o resumo (tokens/s, tempo até o primeiro token) vai para a saída
# de erro, então `> texto.txt` guarda só o texto. Entrada inválida (arquivo inexistente, arquivo que
# não é um checkpoint, prompt maior que o contexto, caractere que o tokenizador por caractere não
# conhece, `--temperature -1`...) termina com uma linha de erro clara e código de saída 2.

# %%
ckpt_file = Path(tcfg.out_dir or ".") / "latest.pt"
if main and ckpt_file.is_file():
    from nanomoe.interop.inference import generate_text, load_model

    gen_model, gen_tok = load_model(tcfg.out_dir, device=args.device)  # latest.pt and its tokenizer
    # the course's corpora open with a name from the text; a prepared folder (FineWeb...) uses the config's prompt
    prompt = args.sample_prompt.strip() if args.data_dir else {"machado": "Capitu", "tinyshakespeare": "ROMEO:"}.get(
        args.dataset, "")
    try:
        prompt_ids = gen_tok.encode(prompt) if prompt else []
    except ValueError:  # a char tokenizer built from another corpus may not know these letters
        prompt_ids = []
    if not prompt_ids:  # then start from the first tokens of the validation text
        prompt_ids = [int(i) for i in val_tokens[0][:8]]
        prompt = gen_tok.decode(prompt_ids)
    # with the KV cache, prompt + new tokens must fit in the context (block_size)
    n_new = min(300, gen_model.config.block_size - len(prompt_ids))

    print("greedy (temperature 0):")
    out = generate_text(gen_model, gen_tok, prompt, max_new_tokens=n_new, temperature=0, stream_to=sys.stdout)
    print(out.stats.summary())
    print("\n3 samples, temperature 0.8, top-k 50, seed 1:")
    out = generate_text(gen_model, gen_tok, prompt, max_new_tokens=n_new, temperature=0.8, top_k=50,
                        num_samples=3, seed=1, stream_to=sys.stdout)
    print(out.stats.summary())

# %% [markdown]
# ### KV cache: quanto ele economiza
#
# Sem cache (o laço do nanoGPT), cada novo token roda o modelo sobre o contexto inteiro de novo:
# o passo *t* custa O(*t*) nas projeções e MLPs e O(*t*²) na atenção. Com o cache, as chaves e
# valores de todas as posições anteriores ficam guardados (`nanomoe/kv_cache.py`) e cada passo
# roda só o token novo. O texto é o mesmo (geração gulosa), só a velocidade muda, e a diferença cresce
# com o comprimento gerado.

# %%
if main and ckpt_file.is_file():
    texts = {}
    for use_cache in (True, False):
        res = generate_text(gen_model, gen_tok, prompt, max_new_tokens=n_new, temperature=0, use_cache=use_cache)
        texts[use_cache] = res[0]
        s = res.stats
        print(f"KV cache {'on ' if use_cache else 'off'}: {s.new_tokens} tokens, {s.tokens_per_s:8.1f} tokens/s, "
              f"time to first token {1000 * s.ttft_s:.1f} ms")
    print("same text with and without the cache:", texts[True] == texts[False])

# %% [markdown]
# ## Exercícios
#
# Preveja antes de abrir a resposta. As respostas 1 e 2 foram medidas com os comandos dos enunciados,
# no tamanho do `--quick` (modelo moderno de 2 camadas, C = 32, contexto 32, lotes de 4, 40 passos,
# avaliação a cada 10, os primeiros 200 mil caracteres de Machado), 1 thread, numa CPU de 2 núcleos.
#
# **1. Mate um treino e retome.** Rode `uv run -m scripts.04_train --quick --max_steps=40
# --eval_interval=10 --out_dir=runs/ex1`, mate o processo no meio (Ctrl-C, ou `kill -9` de outro
# terminal) depois do checkpoint do passo 20, e rode de novo o mesmo comando com `--resume`. As losses
# de validação e os pesos finais serão iguais aos de um treino sem interrupção?
#
# <details><summary>Resposta</summary>
#
# Iguais, até o último dígito. O treino direto deu validação 4,5471 / 4,2331 / 3,9824 / 3,8423 /
# 3,7986 nos passos 0, 10, 20, 30 e 40 (`docs/results/04/exercicios.md`). Numa segunda execução do
# mesmo comando, o `SIGKILL` chegou logo depois do checkpoint do passo 30 (o treino é rápido);
# rodamos de novo com `--resume`: ele continuou do passo 30 e deu 3,7986 no passo 40, e os pesos
# finais são idênticos tensor a tensor aos do treino direto (`torch.equal`). O
# checkpoint guarda pesos, estado do AdamW, passo e geradores, e o lote número *g* é sorteado de
# `(semente, g)`: nada do que vem depois depende de o processo ter morrido. O que se perde ao matar
# é só o trabalho desde o último checkpoint (a cada `eval_interval` passos).
#
# </details>
#
# **2. Retomar com outro `max_steps`.** Treine 20 passos (`--max_steps=20`) e depois retome com
# `--resume --max_steps=40`. O resultado é o de um treino direto de 40 passos?
#
# <details><summary>Resposta</summary>
#
# Não. Aos 20 passos o treino curto já tinha validação 4,1098 (o direto, 3,9824 no mesmo passo): com
# `max_steps=20` o cosseno leva a taxa até `min_lr` no passo 20. Ao retomar com `--max_steps=40`, o
# laço avisa (`max_steps: checkpoint has 20, this run has 40`) e recalcula a taxa pelo passo: ela
# estava em 1,1e-4 no fim do treino curto e volta a 6,5e-4 (65% do pico), o valor do passo 20 num
# cosseno de 40 passos. O treino
# termina em 3,9154, contra 3,7986 do direto. A retomada exata vale para o mesmo `max_steps`; mudar o
# horizonte muda a curva da taxa (é o que o aviso diz).
#
# </details>
#
# **3. Uma ou duas threads?** Numa CPU de 2 núcleos que outros processos também usam, o PyTorch com 2
# threads (o padrão) treina o modelo deste capítulo mais rápido ou mais devagar que com 1
# (`--threads=1`)?
#
# <details><summary>Resposta</summary>
#
# Quase sempre mais devagar, e de forma imprevisível. Medimos (`docs/benchmarks.md`, capítulo 04)
# com os modelos da receita de CPU do nanoGPT (4 camadas, C = 128, como o deste capítulo, mas
# contexto 64): com 2 threads, a melhor execução de cada um ficou entre 18,9 mil e 20,3 mil tokens/s, e as
# outras ficaram entre 700 e 6 mil; com 1 thread, os mesmos modelos fizeram ~13 mil tokens/s, de
# forma estável. (A execução registrada neste notebook, com 1 thread e contexto 128, fez
# 11 418 tokens/s em média.) Cada operação do
# PyTorch divide o trabalho entre as threads e espera a mais lenta; quando outro processo ocupa o
# segundo núcleo, a segunda thread só roda quando o sistema operacional lhe dá a vez, e todas as
# operações esperam por ela. Numa máquina livre, 2 threads costumam ajudar; numa compartilhada,
# 1 thread (ou `OMP_WAIT_POLICY=PASSIVE`) é o seguro.
#
# </details>

# %% [markdown]
# ## O que você aprendeu
#
# - O corpus vira *shards* de tokens em disco, lidos por *memory map*; o lote número *g* é sorteado
#   por um gerador semeado com `(seed, g)`, o que torna a retomada e o DDP exatos.
# - Um só laço (`nanomoe.training.train.train`) serve à CPU, a uma GPU e a várias: warmup + cosseno,
#   acumulação, *clipping*, AdamW, precisão mista (bf16, ou fp16 + `GradScaler`), DDP com `no_sync`.
# - Checkpoints atômicos (arquivo temporário + `fsync` + `os.replace`), lidos com
#   `weights_only=True`; parar e retomar dá as mesmas losses, bit a bit, na CPU.
# - Tokens/s e MFU dizem quanto do hardware o treino usa; FSDP é para quando o modelo não cabe.
# - Uma receita fixa os tokens por passo (`tokens_per_step`), e a acumulação sai dele e do número
#   de processos: a mesma conta numa GPU, em 8 ou em 2 máquinas. `--init_from` parte de pesos
#   prontos (exatos, ou pela transferência parcial do capítulo 05), e a HellaSwag mede o modelo
#   numa tarefa, além da loss.
# - O tokenizador muda o que a loss mede: compare modelos em bits por caractere.
#
# **Para ler.** O laço segue o `train.py` do [nanoGPT](https://github.com/karpathy/nanoGPT).
# Artigos: Micikevicius et al. 2017, [*Mixed Precision Training*](https://arxiv.org/abs/1710.03740);
# Li et al. 2020, [*PyTorch Distributed*](https://arxiv.org/abs/2006.15704) (DDP); Rajbhandari et al.
# 2019, [*ZeRO*](https://arxiv.org/abs/1910.02054) e Zhao et al. 2023,
# [*PyTorch FSDP*](https://arxiv.org/abs/2304.11277); Chowdhery et al. 2022,
# [*PaLM*](https://arxiv.org/abs/2204.02311) (MFU, apêndice B); Sennrich et al. 2015,
# [*BPE*](https://arxiv.org/abs/1508.07909); Zellers et al. 2019, [*HellaSwag*](https://arxiv.org/abs/1905.07830);
# Brown et al. 2020, [*GPT-3*](https://arxiv.org/abs/2005.14165) (tabela 2.1); Loshchilov & Hutter, [*SGDR*](https://arxiv.org/abs/1608.03983)
# e [*AdamW*](https://arxiv.org/abs/1711.05101). Termos: [glossário](../docs/glossario.md).

# %%
cleanup_distributed(dist_info)
