// Greedy answers from llama.cpp itself, through node-llama-cpp's prebuilt llama.cpp library (no compiler needed).
//
//   node benchmarks/llamacpp_greedy.mjs REQUEST.json     # prints one JSON object
//
// REQUEST.json: {"node_modules": folder holding node-llama-cpp, "model": GGUF file, "lora": adapter GGUF or null,
//                "prompts": [user messages], "max_new_tokens": N, "threads": N}
// For each prompt: the chat template stored in the GGUF file (tokenizer.chat_template) is rendered with the
// Jinja engine node-llama-cpp ships (@huggingface/jinja), tokenized by llama.cpp with special tokens parsed
// (BOS added when the file says tokenizer.ggml.add_bos_token), and answered greedily (temperature 0, no
// repetition penalty) until an end-of-generation token or N tokens. benchmarks/bench_gguf_llamacpp.py calls this.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const req = JSON.parse(readFileSync(process.argv[2], "utf8"));
const load = (pkg, entry) => import(pathToFileURL(join(req.node_modules, pkg, entry)).href);
const { getLlama, LlamaLogLevel } = await load("node-llama-cpp", "dist/index.js");
const { Template } = await load("@huggingface/jinja", "dist/index.js");

const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: req.threads });
const model = await llama.loadModel({ modelPath: req.model, gpuLayers: 0 });
const tokenizerMeta = model.fileInfo.metadata.tokenizer ?? {};
const template = tokenizerMeta.chat_template;
if (!template) throw new Error(`${req.model} has no tokenizer.chat_template`);
const addBos = tokenizerMeta.ggml?.add_bos_token === true;
const special = (id) => (id == null ? "" : model.detokenize([id], true));
const context = await model.createContext({
  contextSize: 2048,
  threads: req.threads,
  lora: req.lora ? { adapters: [{ filePath: req.lora, scale: 1 }] } : undefined,
});

const answers = [];
for (const prompt of req.prompts) {
  const text = new Template(template).render({
    messages: [{ role: "user", content: prompt }],
    add_generation_prompt: true,
    bos_token: special(model.tokens.bos),
    eos_token: special(model.tokens.eos),
  });
  let ids = model.tokenize(text, true);
  if (addBos && ids[0] !== model.tokens.bos) ids = [model.tokens.bos, ...ids];
  const sequence = context.getSequence();
  const out = [];
  const start = Date.now();
  for await (const token of sequence.evaluate(ids, { temperature: 0 })) {
    if (model.isEogToken(token)) break;
    out.push(token);
    if (out.length >= req.max_new_tokens) break;
  }
  answers.push({ prompt, prompt_ids: ids, answer_ids: out, answer: model.detokenize(out),
                 seconds: (Date.now() - start) / 1000 });
  sequence.dispose();
}
console.log(JSON.stringify({
  llama_cpp: llama.llamaCppRelease,
  node_llama_cpp: JSON.parse(readFileSync(join(req.node_modules, "node-llama-cpp", "package.json"), "utf8")).version,
  build: llama.buildType,
  answers,
}));
await context.dispose();
await model.dispose();
await llama.dispose();
