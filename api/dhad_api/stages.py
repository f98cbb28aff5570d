"""Typed settings of each training stage: continued pre-training, SFT, RLAIF sub-stages, evaluation."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints

from dhad_api.base import DhadModel, Rule, RuledModel
from dhad_api.common import ModelSpec, SecretKeySelector, ShortText
from dhad_api.data_prep import FieldName, SourceFormat, Uri
from dhad_api.training import Optimization

LongText = Annotated[str, StringConstraints(max_length=32768)]


class Vocabulary(DhadModel):
    """AceGPT-v1.5 style vocabulary expansion before continued pre-training."""

    new_tokens: int = Field(0, ge=0, le=262144, description="newTokens is how many Arabic BPE tokens to add; 0 disables expansion. Default 0.")
    corpus: Uri | None = Field(None, description="corpus is the text to learn the new merges from (a bounded sample of it, see sampleMegabytes). Empty means a sample of the job's cleaned, deduplicated data.")
    sample_megabytes: float = Field(
        64, gt=0, le=65536,
        description="sampleMegabytes bounds the text the new merges are learned from, in MB of UTF-8: a fixed pseudo-random sample, streamed, the same for any number of prepare workers. Default 64.",
    )
    warmup_steps: int = Field(
        0, ge=0, le=1_000_000,
        description="warmupSteps trains only the input and output embeddings for this many optimizer steps before full training starts, so the new rows settle before they move the rest of the model. Default 0 (none).",
    )


class PretrainTraining(Optimization):
    """Continued pre-training: optimisation plus a token budget."""

    max_tokens: int | None = Field(
        None, ge=1, le=10**15,
        description="maxTokens stops training after this many training tokens (over all processes). Empty means see maxSteps/epochs.",
    )

    rules = Optimization.rules + (
        Rule("!(has(self.maxTokens) && (has(self.maxSteps) || has(self.epochs)))",
             "training: set at most one of maxTokens, maxSteps and epochs",
             lambda t: t.max_tokens is None or (t.max_steps is None and t.epochs is None)),
    )


class SFTSchema(StrEnum):
    """How an SFT dataset's records are laid out."""

    MESSAGES = "messages"
    INSTRUCTION_RESPONSE = "instruction-response"
    PROMPT_COMPLETION = "prompt-completion"


class SFTFields(DhadModel):
    """Record field names, for datasets whose columns are named differently."""

    messages: FieldName = Field("messages", description="messages is the field with the chat turns (schema messages). Default messages.")
    instruction: FieldName = Field("instruction", description="instruction is the instruction field (schema instruction-response). Default instruction.")
    input: FieldName = Field("input", description="input is the optional extra-context field appended to the instruction. Default input.")
    response: FieldName = Field("response", description="response is the answer field (schema instruction-response). Default response.")
    prompt: FieldName = Field("prompt", description="prompt is the prompt field (schema prompt-completion). Default prompt.")
    completion: FieldName = Field("completion", description="completion is the completion field (schema prompt-completion). Default completion.")


class SFTDataset(DhadModel):
    """One instruction dataset and how to read it."""

    uri: Uri = Field(description="uri is the file, glob or s3:// prefix of the dataset (jsonl or parquet), or hf://org/name. Required.")
    format: SourceFormat = Field(SourceFormat.AUTO, description="format is auto, jsonl or parquet. Default auto (from the extension).")
    schema_: SFTSchema = Field(SFTSchema.MESSAGES, alias="schema", description="schema is messages, instruction-response or prompt-completion. Default messages.")
    fields: SFTFields = Field(default_factory=SFTFields, description="fields maps the schema's parts to record fields. Default: the names of the parts.")
    weight: float = Field(1.0, gt=0, le=1000, description="weight is this dataset's share in the mix, relative to the others. Default 1.")


class ChatTemplateSource(StrEnum):
    """Which chat template renders conversations."""

    MODEL = "model"
    CHATML = "chatml"
    CUSTOM = "custom"


class ChatTemplate(RuledModel):
    """The chat template used to render training conversations."""

    source: ChatTemplateSource = Field(
        ChatTemplateSource.CHATML,
        description="source is model (the tokenizer's own), chatml (Dhad's ChatML with generation markers) or custom. Default chatml.",
    )
    template: LongText | None = Field(None, description="template is the Jinja template, only with source custom. Empty otherwise.")

    rules = (
        Rule("(self.source == 'custom') == has(self.template)", "chatTemplate: template is set exactly when source is custom",
             lambda c: (c.source == ChatTemplateSource.CUSTOM) == (c.template is not None), ".template"),
    )


class Lora(DhadModel):
    """Low-rank adapters through peft instead of full fine-tuning."""

    r: int = Field(16, ge=1, le=1024, description="r is the adapter rank. Default 16.")
    alpha: int = Field(32, ge=1, le=4096, description="alpha is the adapter scaling numerator. Default 32.")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout is the adapter dropout. Default 0.05.")
    target_modules: list[Annotated[str, StringConstraints(max_length=64)]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], max_length=32,
        description="targetModules are the module names adapters wrap. Default the attention projections.",
    )
    merge: bool = Field(True, description="merge folds the adapters into the base weights in the final model. Default true.")


class SFTTraining(Optimization):
    """Supervised fine-tuning settings."""

    sequence_length: int = Field(2048, ge=16, le=1_048_576, description="sequenceLength is the longest training sequence, in tokens. Default 2048.")
    packing: bool = Field(True, description="packing packs conversations into sequences (best-fit, no attention across conversations). Default true.")
    assistant_only_loss: bool = Field(True, description="assistantOnlyLoss trains only on assistant tokens. Default true.")
    system_prompt: LongText | None = Field(None, description="systemPrompt is a system message added to conversations without one. Empty means none.")
    chat_template: ChatTemplate = Field(default_factory=ChatTemplate, description="chatTemplate picks the template. Default chatml.")
    lora: Lora | None = Field(None, description="lora trains low-rank adapters. Empty means full fine-tuning.")


class Endpoint(DhadModel):
    """An OpenAI-compatible chat completions endpoint (vLLM, TGI, a hosted API)."""

    base_url: Annotated[str, StringConstraints(pattern=r"^https?://[^@\s]+$", max_length=512)] = Field(
        description="baseUrl is the API base, for example https://host/v1. Required."
    )
    model: ShortText = Field(description="model is the model name sent in each request. Required.")
    api_key_secret_ref: SecretKeySelector | None = Field(None, description="apiKeySecretRef is the Secret key holding the API key. Empty means no key.")
    max_concurrency: int = Field(8, ge=1, le=1024, description="maxConcurrency bounds requests in flight. Default 8.")
    requests_per_minute: int | None = Field(None, ge=1, le=1_000_000, description="requestsPerMinute caps the request rate. Empty means no cap.")
    tokens_per_minute: int | None = Field(None, ge=1, le=1_000_000_000, description="tokensPerMinute caps prompt+completion tokens per minute. Empty means no cap.")
    timeout_seconds: int = Field(120, ge=1, le=3600, description="timeoutSeconds is the per-request timeout. Default 120.")
    max_retries: int = Field(5, ge=0, le=50, description="maxRetries is how often a 429/5xx/timeout is retried, with backoff. Default 5.")


class Judge(RuledModel):
    """A model that compares two answers: a local model or an HTTP endpoint."""

    model: ModelSpec | None = Field(None, description="model is a local judge model run with transformers. Exactly one of model and endpoint.")
    endpoint: Endpoint | None = Field(None, description="endpoint is an OpenAI-compatible judge. Exactly one of model and endpoint.")
    max_new_tokens: int = Field(512, ge=1, le=32768, description="maxNewTokens bounds each judgement. Default 512.")
    max_attempts: int = Field(3, ge=1, le=20, description="maxAttempts is how often an unparseable or refused judgement is asked again. Default 3.")

    rules = (
        Rule("has(self.model) != has(self.endpoint)", "judge: set exactly one of model and endpoint",
             lambda j: (j.model is None) != (j.endpoint is None)),
    )


class Generation(DhadModel):
    """Sampling settings."""

    max_new_tokens: int = Field(256, ge=1, le=32768, description="maxNewTokens bounds each response. Default 256.")
    temperature: float = Field(0.8, ge=0, le=5, description="temperature is the sampling temperature; 0 is greedy. Default 0.8.")
    top_p: float = Field(0.95, gt=0, le=1, description="topP is the nucleus sampling mass. Default 0.95.")


class PairSelection(StrEnum):
    """Which response pairs of one prompt the judge compares."""

    ALL_PAIRS = "all-pairs"
    ADJACENT = "adjacent"
    FIRST_VERSUS_REST = "first-versus-rest"


class Feedback(DhadModel):
    """RLAIF feedback: sample responses, have the judge compare them under a constitution."""

    prompts: list[SFTDataset] = Field(min_length=1, max_length=32, description="prompts are the prompt datasets (schema prompt-completion or messages). Required.")
    samples_per_prompt: int = Field(4, ge=2, le=64, description="samplesPerPrompt is k, the responses sampled per prompt. Default 4.")
    pairs: PairSelection = Field(
        PairSelection.ADJACENT,
        description="pairs picks which pairs are judged: all-pairs (k(k-1)/2, each in both orders), adjacent (k-1) or first-versus-rest (k-1). Default adjacent.",
    )
    judge: Judge = Field(description="judge compares responses. Required.")
    constitution: LongText | None = Field(None, description="constitution is the principles text the judge applies. Empty means Dhad's Arabic default (helpful, honest, harmless, respectful of Arab culture, religion and values).")
    language: Annotated[str, StringConstraints(pattern=r"^[a-z]{2}$")] = Field("ar", description="language is the language judgements are asked in. Default ar.")
    generation: Generation = Field(default_factory=Generation, description="generation is how responses are sampled. Default Generation's defaults.")
    held_out_fraction: float = Field(0.1, ge=0, lt=1, description="heldOutFraction is the share of prompts kept out of reward training for evaluation. Default 0.1.")
    use_forced_verdicts: bool = Field(
        False,
        description="useForcedVerdicts keeps pairs that a local judge decided by its likelihood fallback (its answer held no verdict) "
        "as preference pairs. Forced verdicts are always counted apart and never count toward the agreement rate. Default false.",
    )


class RewardStage(DhadModel):
    """RLAIF reward model training on the judged pairs."""

    training: Optimization = Field(default_factory=Optimization, description="training is the reward model's optimisation. Default Optimization's defaults.")
    sequence_length: int = Field(1024, ge=16, le=1_048_576, description="sequenceLength bounds prompt+response, in tokens. Default 1024.")
    culture_set: Uri | None = Field(None, description="cultureSet is a preference set of Arabic cultural and value questions to report accuracy on, per topic. Empty means Dhad's own.")
    benchmarks: Uri | None = Field(
        None,
        description="benchmarks is where the AceGPT benchmark files live (folder or s3:// prefix laid out like the EvalJob's); when set, "
        "the reward model is also scored on ACVA, each statement as a preference between its affirmation and its negation. Empty skips ACVA.",
    )
    acva_limit: int | None = Field(None, ge=1, le=1_000_000, description="acvaLimit caps ACVA statements per topic. Empty means all.")


class PolicyAlgorithm(StrEnum):
    """Policy optimisation algorithm: PPO (Dhad's loop on TRL and transformers parts) or a TRL trainer."""

    PPO = "ppo"
    GRPO = "grpo"
    RLOO = "rloo"
    ONLINE_DPO = "online-dpo"
    DPO = "dpo"


class PPO(DhadModel):
    """PPO's own settings (algorithm ppo): the rollout batch is microBatchSize x gradientAccumulationSteps x miniBatches
    prompts per process, one completion each, and is trained on for `epochs` passes."""

    epochs: int = Field(4, ge=1, le=64, description="epochs is how many passes are made over each rollout batch. Default 4.")
    mini_batches: int = Field(1, ge=1, le=1024, description="miniBatches is how many optimizer steps one pass over a rollout batch makes. Default 1.")
    clip_range: float = Field(0.2, gt=0, le=10, description="clipRange is epsilon of the clipped policy ratio. Default 0.2.")
    value_clip_range: float = Field(0.2, gt=0, le=1000, description="valueClipRange bounds how far a value prediction may move from the rollout's before its loss is clipped. Default 0.2.")
    value_coefficient: float = Field(0.1, gt=0, le=100, description="valueCoefficient weighs the critic's loss against the policy's. Default 0.1.")
    gamma: float = Field(1.0, gt=0, le=1, description="gamma is the discount over response tokens. Default 1.")
    lam: float = Field(0.95, ge=0, le=1, description="lam is GAE's lambda. Default 0.95.")
    kl_target: float | None = Field(
        None, gt=0, le=1000,
        description="klTarget makes the KL coefficient adaptive: it starts at klCoefficient and moves each rollout so the KL to the "
        "reference per response stays near this many nats. Empty keeps klCoefficient fixed.",
    )
    kl_horizon: int = Field(10000, ge=1, le=10**9, description="klHorizon is the adaptive controller's horizon, in sequences. Default 10000.")
    whiten_rewards: bool = Field(False, description="whitenRewards whitens the per-token rewards of each rollout before GAE (advantages are always whitened). Default false.")


class PolicyStage(DhadModel):
    """RLAIF policy optimisation against the reward model (or on the pairs, for DPO)."""

    algorithm: PolicyAlgorithm = Field(PolicyAlgorithm.GRPO, description="algorithm is ppo, grpo, rloo, online-dpo or dpo. Default grpo.")
    kl_coefficient: float = Field(0.04, ge=0, le=100, description="klCoefficient (beta) weighs the KL penalty to the frozen reference (ppo: the starting value when ppo.klTarget is set). Default 0.04.")
    generations_per_prompt: int = Field(4, ge=2, le=256, description="generationsPerPrompt is the group size for grpo/rloo and online-dpo; ppo samples one completion per prompt. Default 4.")
    ppo: PPO = Field(default_factory=PPO, description="ppo holds PPO's settings (algorithm ppo only). Default PPO's defaults.")
    lora: Lora | None = Field(
        None,
        description="lora trains low-rank adapters on the policy (and on ppo's critic); the reference is then the policy with its adapters "
        "off and ppo's reward model the critic with its adapters off, so no second copy of either model is loaded. Empty means full fine-tuning.",
    )
    generation: Generation = Field(default_factory=Generation, description="generation is how rollouts are sampled. Default Generation's defaults.")
    reward_model: ModelSpec | None = Field(None, description="rewardModel is the reward model. Empty means the one the reward sub-stage trained.")
    training: Optimization = Field(
        default_factory=lambda: Optimization(learning_rate=1e-6, micro_batch_size=4),
        description="training is the policy's optimisation. Default learningRate 1e-6, microBatchSize 4.",
    )
    use_vllm: bool = Field(False, description="useVllm generates rollouts with vLLM on GPUs. Default false.")


class Suite(StrEnum):
    """Arabic benchmark suites (AceGPT's files or their community copies)."""

    ACVA = "acva"
    ARABIC_MMLU = "arabic-mmlu"
    EXAMS = "exams"
    VICUNA_80 = "vicuna-80"
    ALPACA_EVAL = "alpaca-eval"


class EvalMethod(StrEnum):
    """How multiple-choice and yes/no suites are scored; reports always say which."""

    GENERATE = "generate"
    LOGLIKELIHOOD = "loglikelihood"


class LimitPer(StrEnum):
    """How `limit` spreads a sample over a suite's subjects (MMLU, EXAMS), topics (ACVA) or labels."""

    TOTAL = "total"
    SUBJECT = "subject"


class OpenEndedMetric(StrEnum):
    """How open-ended answers are judged against the reference system's."""

    JUDGE_SCORES = "judge-scores"
    JUDGE_PAIRWISE = "judge-pairwise"


class ComparedModel(DhadModel):
    """Another model scored on the same items as spec.model and shown beside it in the report."""

    name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=20)] = Field(
        description="name labels the model in the report and in status scores (<name>:<suite>/<method>). Required."
    )
    model: ModelSpec = Field(description="model is where the weights come from (uri or fromJob, as spec.model). Required.")


class Evaluation(RuledModel):
    """Which suites to run and how."""

    suites: list[Suite] = Field(min_length=1, max_length=5, description="suites are the benchmarks to run. Required.")
    method: EvalMethod = Field(EvalMethod.GENERATE, description="method is generate (AceGPT-compatible) or loglikelihood. Default generate.")
    shots: int = Field(0, ge=0, le=5, description="shots is the number of dev examples in each prompt (5 for base models as AceGPT). Default 0.")
    limit: int | None = Field(None, ge=1, le=1_000_000, description="limit draws a seeded sample of this many items per suite, stratified by subject or topic (see limitPer); the report lists the item ids. Empty means all items.")
    limit_per: LimitPer = Field(LimitPer.TOTAL, description="limitPer is total (limit items in all, each subject's share proportional to its size) or subject (limit items from every subject). Default total.")
    seed: int = Field(0, ge=0, le=2_147_483_647, description="seed draws the sample and the bootstrap intervals; the report records it. Default 0.")
    batch_size: int = Field(8, ge=1, le=1024, description="batchSize is items per forward pass. Default 8.")
    benchmarks: Uri | None = Field(None, description="benchmarks is where the suite files live (folder, s3:// prefix or hf://). Empty means the community hf:// copies.")
    reference_answers: Uri | None = Field(None, description="referenceAnswers holds the reference system's answers for open-ended suites. Required with vicuna-80 or alpaca-eval.")
    judge: Judge | None = Field(None, description="judge compares open-ended answers with the reference. Required with vicuna-80 or alpaca-eval.")
    open_ended_metrics: list[OpenEndedMetric] = Field(
        default_factory=lambda: [OpenEndedMetric.JUDGE_SCORES.value, OpenEndedMetric.JUDGE_PAIRWISE.value], min_length=1, max_length=2, validate_default=True,
        description="openEndedMetrics are judge-scores (AceGPT's figure: both answers scored 1-10 in one prompt, in both positions; the ratio of summed scores) and judge-pairwise (the judge prefers one answer, in both orders). Default both.",
    )
    runs: int = Field(3, ge=1, le=10, description="runs is how often judge-scores scores every question in both positions (AceGPT: 3; runs after the first are sampled); the report gives the mean ratio and its spread. Default 3.")
    use_vllm: bool = Field(False, description="useVllm generates answers and log-likelihoods with vLLM on GPUs when it is installed; otherwise batched transformers, and the report says so. Default false.")
    compare: list[ComparedModel] = Field(
        default_factory=list, max_length=7,
        description="compare are more models scored on the same items and shown side by side with spec.model (for example the recipe's base, CPT and SFT models). Default none.",
    )
    exclude_duplicates: bool = Field(False, description="excludeDuplicates also scores without duplicated questions (both figures are reported). Default false.")

    rules = (
        Rule("!self.suites.exists(s, s == 'vicuna-80' || s == 'alpaca-eval') || (has(self.judge) && has(self.referenceAnswers))",
             "evaluation: open-ended suites (vicuna-80, alpaca-eval) need judge and referenceAnswers",
             lambda e: not ({Suite.VICUNA_80, Suite.ALPACA_EVAL} & set(e.suites)) or (e.judge is not None and e.reference_answers is not None)),
        Rule("self.suites.all(x, self.suites.exists_one(y, y == x))", "evaluation: suites must not repeat",
             lambda e: len(set(e.suites)) == len(e.suites), ".suites"),
        Rule("self.openEndedMetrics.all(x, self.openEndedMetrics.exists_one(y, y == x))", "evaluation: openEndedMetrics must not repeat",
             lambda e: len(set(e.open_ended_metrics)) == len(e.open_ended_metrics), ".openEndedMetrics"),
        Rule("self.compare.all(x, self.compare.exists_one(y, y.name == x.name))", "evaluation: compare names must be unique",
             lambda e: len({c.name for c in e.compare}) == len(e.compare), ".compare"),
    )


class Teacher(RuledModel):
    """The model that answers native Arabic prompts: an HTTP endpoint or a local model."""

    endpoint: Endpoint | None = Field(None, description="endpoint is an OpenAI-compatible teacher. Exactly one of endpoint and model.")
    model: ModelSpec | None = Field(None, description="model is a local teacher run with transformers (vLLM on GPUs when useVllm). Exactly one of endpoint and model.")
    use_vllm: bool = Field(False, description="useVllm generates with vLLM on GPUs (local model only). Default false.")

    rules = (
        Rule("has(self.endpoint) != has(self.model)", "teacher: set exactly one of endpoint and model",
             lambda t: (t.endpoint is None) != (t.model is None)),
    )


class QualityGates(DhadModel):
    """Checks every teacher response must pass; rejected rows go to a side file with their reason."""

    min_arabic_ratio: float = Field(0.6, ge=0, le=1, description="minArabicRatio is the least share of letters in Arabic script. Default 0.6.")
    refusal_patterns: list[Annotated[str, StringConstraints(max_length=256)]] = Field(
        default_factory=list, max_length=128,
        description="refusalPatterns are extra regular expressions that mark a refusal, added to Dhad's Arabic and English list. Default none extra.",
    )
    drop_truncated: bool = Field(True, description="dropTruncated rejects responses that stopped at the token limit (finish_reason length). Default true.")
    deduplicate: bool = Field(True, description="deduplicate drops responses identical to an earlier one after normalisation. Default true.")


class Respond(DhadModel):
    """SFT's optional first sub-stage: a teacher answers native Arabic prompts, SFT trains on the result."""

    prompts: list[SFTDataset] = Field(min_length=1, max_length=32, description="prompts are the prompt datasets (schema prompt-completion reads fields.prompt; messages uses all but a final assistant turn). Required.")
    teacher: Teacher = Field(description="teacher answers the prompts. Required.")
    system_prompt: LongText | None = Field(None, description="systemPrompt is sent to the teacher before each prompt. Empty means none.")
    generation: Generation = Field(default_factory=lambda: Generation(temperature=0.7, max_new_tokens=1024), description="generation is the teacher's sampling. Default temperature 0.7, maxNewTokens 1024.")
    responses_per_prompt: int = Field(1, ge=1, le=16, description="responsesPerPrompt is n, the answers kept per prompt. Default 1.")
    quality: QualityGates = Field(default_factory=QualityGates, description="quality are the gates each response must pass. Default QualityGates' defaults.")
