"""One paragraph per chapter for its page and the chapter index: what it teaches and where it gets.

Written from the README's chapter table (the figures are the README's, which quote the notebooks'
outputs). A chapter without an entry here still gets its page: its summary is then the first
paragraph of the notebook's introduction.
"""

RESUMOS: dict[str, str] = {
    "01": (
        "O GPT-2 do nanoGPT, em miniatura, aprende a decorar um parágrafo. O capítulo mostra por que os "
        "alvos são a entrada deslocada de uma posição, o que a loss e a perplexidade valem no início "
        "(perto de ln V e de V) e como a reconstrução e a continuação gulosa melhoram a cada quarto do "
        "treino. Em 70 passos a perplexidade cai de 37 para 1,06 e o modelo reescreve o parágrafo inteiro."
    ),
    "02": (
        "O GPT-2 vira um modelo moderno, uma chave de GPTConfig de cada vez: RoPE, RMSNorm, SwiGLU, "
        "GQA/MQA, atenção SDPA, camadas sem bias e soft-capping dos logits, e depois o KV cache. Na "
        "ablação no Machado de Assis (caracteres, 614 mil tokens por configuração) a loss de validação "
        "cai de 2,351 (GPT-2) para 1,971 com RoPE, RMSNorm e SwiGLU, e o KV cache gera os mesmos tokens "
        "5,4× mais rápido em 512 tokens."
    ),
    "03": (
        "Uma camada Mixture of Experts que aprende de verdade: roteador top-k, soma ponderada pelos "
        "gates, perdas de balanceamento e z-loss, capacidade dos especialistas e as métricas e gráficos "
        "de uso de cada um. Com os mesmos parâmetros ativos e os mesmos tokens, o denso ainda ganha com "
        "614 mil tokens, mas com 1,84 milhão o MoE top-2 passa à frente nas duas sementes; sem a loss de "
        "balanceamento o roteador colapsa e sete especialistas morrem."
    ),
    "04": (
        "Treino de verdade, do notebook a várias GPUs: shards de tokens, DDP com torchrun, precisão mista "
        "(bf16, ou fp16 com GradScaler), checkpoints atômicos com retomada bit a bit e geração de texto a "
        "partir de um checkpoint. Em 2000 passos no Machado por caractere a loss de validação vai de 4,92 "
        "a 1,494 (perplexidade 4,45), e na receita de CPU do nanoGPT o preset moderno chega a 1,69, "
        "contra 1,886 do nanoGPT."
    ),
    "05": (
        "Os pesos do GPT-2 entram no curso: carga exata, ajuste fino em português, transferência parcial "
        "para a arquitetura moderna, upcycling para MoE e exportação para o Hugging Face. Os logits do "
        "nosso GPT-2 batem com os do transformers, os modelos exportados (GPT-2, Llama, Mixtral) abrem no "
        "AutoModelForCausalLM com os mesmos logits e o MoE obtido por upcycling é igual ao denso no "
        "passo 0; sem internet, tudo roda com um GPT-2 minúsculo substituto."
    ),
    "06": (
        "Os roteadores modernos, uma chave de cada vez sobre o MoE top-2 do capítulo 03: pontuação "
        "sigmoide, viés de seleção sem loss auxiliar, loss por sequência, lote global, um especialista "
        "compartilhado, especialistas finos e primeira camada densa, e depois a receita do DeepSeek-V3 "
        "inteira, com a loss de balanceamento contando f_i sem o viés, como a eq. 18 do artigo. Em 66 "
        "treinos registrados (3 sementes, caracteres e BPE português) quase nada se separa do ruído "
        "entre sementes: com caracteres só a receita do V3 inteira fica abaixo da base nas três "
        "sementes, e com BPE só os especialistas finos ficam mensuravelmente piores. O capítulo mede "
        "também o que o roteador aprende: coativação, especialização e saturação como o OLMoE a define."
    ),
    "07": (
        "Um MoE em várias GPUs com paralelismo de especialistas: cada rank guarda uma fatia dos "
        "especialistas, tokens e contagens trocam de rank com um all_to_all diferenciável, os pesos "
        "densos têm média entre ranks e os especialistas não, e os checkpoints guardam os especialistas "
        "inteiros. Lançado pelo notebook com torchrun na CPU, a camada em 2 e 4 ranks dá as mesmas saídas "
        "e gradientes que um processo só, e o tráfego medido por passo bate com o previsto."
    ),
    "08": (
        "Decodificar rápido: com lote 1 cada token novo lê uma vez todos os pesos que usa, então os "
        "tokens/s não passam da banda de memória dividida pelos bytes lidos por token. O capítulo mede "
        "esse limite na máquina do leitor, constrói um KV cache estático e um passo de um token que o "
        "torch.compile captura, pesos bf16 e int8 por canal de saída (com a qualidade medida), mostra a "
        "virada de limitado pela memória para limitado pelo cálculo quando o lote cresce, e por que um "
        "MoE com lote 1 custa quase o mesmo que o seu gêmeo denso de parâmetros ativos."
    ),
}
