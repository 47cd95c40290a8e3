// penwright's generation in the browser: the exported graph on onnxruntime-web (WASM), the tokenizer on
// @huggingface/tokenizers, a chat template on @huggingface/jinja; all three files sit beside this one (the
// site is self-contained: nothing is fetched from anywhere else).
//
// It runs the graph the way penwright's Python engine does for one sequence: a prefill of the prompt with an
// empty past, then one token at a time with the past the graph returned; greedy picks the first highest logit
// (numpy's argmax), as the engine does, so temperature 0 gives the text `penwright generate` gives.
import * as ort from "./ort.wasm.bundle.min.mjs";
import { Tokenizer } from "./tokenizers.min.mjs";
import { Template } from "./jinja.mjs";

const hex = (buffer) => Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");

async function fetched(url, as) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${response.statusText} (is the site folder whole?)`);
  return as === "json" ? response.json() : response.arrayBuffer();
}

// The site (site.json) and its model, loaded; a graph whose sha256 is not the one the site was built with is
// refused in one line.
export async function load(onStatus = () => {}) {
  const site = await fetched("site.json", "json");
  const [tokenizerJson, tokenizerConfig, config] = await Promise.all(
    ["tokenizer.json", "tokenizer_config.json", "config.json"].map((f) => fetched(f, "json")),
  );
  onStatus(`loading ${site.graph} (${(site.graph_bytes / 2 ** 20).toFixed(1)} MiB)…`);
  const graph = await fetched(site.graph);
  const digest = hex(await crypto.subtle.digest("SHA-256", graph));
  if (digest !== site.sha256) {
    throw new Error(
      `${site.graph} has sha256 ${digest.slice(0, 12)}…, not the ${site.sha256.slice(0, 12)}… this site was built ` +
        "with: rebuild the site (penwright site) from the export you mean to share",
    );
  }
  const params = new URLSearchParams(location.search);
  const wanted = parseInt(params.get("threads") ?? "", 10);
  const most = Math.max(1, Math.min(site.max_threads, navigator.hardwareConcurrency || 1));
  ort.env.wasm.numThreads = self.crossOriginIsolated ? (wanted > 0 ? Math.min(wanted, most) : most) : 1;
  // (the bundle finds its .wasm beside itself: no wasmPaths, nothing asked of any other host)
  const session = await ort.InferenceSession.create(new Uint8Array(graph), {
    executionProviders: ["wasm"],
    graphOptimizationLevel: "all",
  });
  const template = tokenizerConfig.chat_template ? new Template(tokenizerConfig.chat_template) : null;
  return new Model(site, session, new Tokenizer(tokenizerJson, tokenizerConfig), config, template);
}

// A seeded random stream (mulberry32): the same seed, the same draws on every browser.
function random(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// Give the page a turn to paint (and the Stop button to be pressed). A message, not setTimeout(0): browsers hold a
// chain of timeouts back 4 ms each, longer than a small model's whole step.
function paint() {
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => resolve();
    channel.port2.postMessage(null);
  });
}

function argmax(row) {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

// Temperature, then top-k, then top-p over the kept tokens, then one draw.
function sample(row, { temperature, topK, topP }, draw) {
  if (!(temperature > 0)) return argmax(row);
  let order = Array.from(row.keys()).sort((a, b) => row[b] - row[a]);
  if (topK > 0) order = order.slice(0, topK);
  const top = row[order[0]];
  let weights = order.map((i) => Math.exp((row[i] - top) / temperature));
  let total = weights.reduce((s, w) => s + w, 0);
  if (topP < 1) {
    let kept = 0, mass = 0;
    while (kept < weights.length && mass < topP * total) mass += weights[kept++];
    order = order.slice(0, kept); weights = weights.slice(0, kept); total = mass;
  }
  let r = draw() * total;
  for (let i = 0; i < order.length; i++) if ((r -= weights[i]) <= 0) return order[i];
  return order[order.length - 1];
}

class Model {
  constructor(site, session, tokenizer, config, template) {
    Object.assign(this, { site, session, tokenizer, config, template });
    this.eos = config.eos_token_id;
    this.context = config.n_positions;
    this.layers = config.n_layer;
    this.heads = config.n_head;
    this.headDim = config.n_embd / config.n_head;
    this.threads = ort.env.wasm.numThreads;
  }

  // The prompt's ids; an empty prompt is <|endoftext|> alone, as penwright's engine reads it.
  encode(text) {
    const ids = text ? this.tokenizer.encode(text, { add_special_tokens: false }).ids : [];
    return ids.length ? ids : [this.eos];
  }

  decode(ids) {
    return ids.length ? this.tokenizer.decode(ids) : "";
  }

  // A conversation as the model's chat template writes it, ready for the persona's reply.
  chatPrompt(messages) {
    const eos = this.tokenizer.decode([this.eos]);
    return this.template.render({ messages, add_generation_prompt: true, bos_token: eos, eos_token: eos });
  }

  feeds(ids, past, start) {
    const n = ids.length, total = start + n;
    const feeds = {
      input_ids: new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), [1, n]),
      attention_mask: new ort.Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]),
      position_ids: new ort.Tensor("int64", BigInt64Array.from({ length: n }, (_, i) => BigInt(start + i)), [1, n]),
    };
    for (let l = 0; l < this.layers; l++) {
      for (const kv of ["key", "value"]) {
        feeds[`past_key_values.${l}.${kv}`] =
          past?.[`present.${l}.${kv}`] ?? new ort.Tensor("float32", new Float32Array(0), [1, this.heads, 0, this.headDim]);
      }
    }
    return feeds;
  }

  // Generate after ``ids``: onText(piece) as the text grows (a piece never splits a character); stops at
  // <|endoftext|> (not before minTokens), maxTokens or the context. Returns {text, tokens, reason, seconds, firstTokenSeconds}.
  async generate(ids, { maxTokens = 128, minTokens = 0, temperature = 0.8, topK = 40, topP = 1, seed = null, signal = null } = {}, onText = () => {}) {
    const draw = random(seed ?? Math.floor(Math.random() * 2 ** 32));
    const started = performance.now();
    let firstToken = null, past = null, start = 0, input = ids.slice(-(this.context - 1));
    const tokens = [];
    let shown = "", reason = "length", painted = performance.now(), running = 0;
    while (tokens.length < maxTokens) {
      if (signal?.aborted) { reason = "stopped"; break; }
      const before = performance.now();
      const out = await this.session.run(this.feeds(input, past, start));
      running += performance.now() - before;
      if (past) for (const t of Object.values(past)) t.dispose?.();
      const logits = out.logits, vocab = logits.dims[2], n = logits.dims[1];
      const row = logits.data.subarray((n - 1) * vocab, n * vocab);
      if (tokens.length < minTokens) row[this.eos] = -Infinity;  // (no end of text before minTokens)
      const token = sample(row, { temperature, topK, topP }, draw);
      logits.dispose?.();
      past = Object.fromEntries(Object.entries(out).filter(([k]) => k.startsWith("present.")));
      start += input.length;
      firstToken ??= performance.now();
      if (token === this.eos) { reason = "stop"; break; }
      tokens.push(token);
      input = [token];
      const text = this.decode(tokens);
      if (!text.endsWith("\uFFFD") && text.length > shown.length) { onText(text.slice(shown.length)); shown = text; }
      if (start >= this.context) break;  // every position used: the last token is shown, never fed
      if (performance.now() - painted > 25) { await paint(); painted = performance.now(); }  // the page shows it
    }
    if (past) for (const t of Object.values(past)) t.dispose?.();
    const text = this.decode(tokens);
    if (text.length > shown.length) onText(text.slice(shown.length));
    const now = performance.now();
    return { text, tokens, reason, seconds: (now - started) / 1000, firstTokenSeconds: ((firstToken ?? now) - started) / 1000,
             runSeconds: running / 1000 };
  }
}
