// transformers.js on a penwright export, offline: `node transformers_js_greedy.mjs MODEL_DIR N PROMPT...` prints,
// as JSON, each prompt's greedy new token ids (pipeline("text-generation") on local files, no remote models).
import { env, pipeline } from "@huggingface/transformers";

const [dir, n, ...prompts] = process.argv.slice(2);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = "/";
const generator = await pipeline("text-generation", dir, { dtype: "fp32", local_files_only: true });
const out = [];
for (const prompt of prompts) {
  const inputs = generator.tokenizer(prompt || generator.tokenizer.eos_token, { add_special_tokens: false });
  const ids = await generator.model.generate({ ...inputs, max_new_tokens: Number(n), do_sample: false });
  const all = Array.from(ids.data, Number);
  out.push(all.slice(inputs.input_ids.dims[1]));
}
console.log(JSON.stringify(out));
