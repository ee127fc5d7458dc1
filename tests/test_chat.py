"""Chat templates: conversations laid out token for token as transformers lays them out, the
library's `chat`, the job's chat prompts, and `generate`'s fixed slots and length policy."""

import json
import pathlib
import shutil

import pytest
import transformers

import jaxpp
from jaxpp.errors import JaxppError
from jaxpp.job import compile_cache
from jaxpp.job import files as jobio
from jaxpp.job.prompter import Prompter
from jaxpp.load.chat_template import ChatTemplate
from jaxpp.load.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = REPO / "models" / "harbor-tiny"  # a trained Llama with a real BPE tokenizer

# Real-style templates of four families (their structure, written for these tests).
TEMPLATES = {
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
        "'<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>"
        "\\n\\n' }}{% endif %}"),
    "qwen": (  # ChatML with a default system message, written over several lines
        "{% for message in messages %}\n"
        "    {% if loop.first and messages[0]['role'] != 'system' %}\n"
        "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
        "    {% endif %}\n"
        "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}\n"
        "    {{- '<|im_start|>assistant\\n' }}\n"
        "{% endif %}\n"),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}"
        "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + "
        "' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + "
        "eos_token }}{% endif %}{% endfor %}"),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}{% if message['role'] == 'assistant' %}"
        "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
        "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<start_of_turn>model\\n' }}{% endif %}"),
}
CONVERSATIONS = {
    "user": [dict(role="user", content="My invoice was charged twice in March.")],
    "system": [dict(role="system", content="Summarise in one line."),
               dict(role="user", content="  The app crashes on login; ünïcode too.  ")],
    "turns": [dict(role="user", content="Hello"), dict(role="assistant", content="Hi!"),
              dict(role="user", content="Refund please")],
}
SUPPORTED = {("mistral", "system"), ("gemma", "system")}  # those two raise on a system role


def tokenizer_dir(tmp_path: pathlib.Path, template, *, jinja_file: bool = False
                  ) -> pathlib.Path:
  d = tmp_path / "tok"
  d.mkdir(parents=True, exist_ok=True)
  for f in ("tokenizer.json", "config.json", "model.safetensors", "generation_config.json"):
    shutil.copy(TINY / f, d / f)
  config = json.loads((TINY / "tokenizer_config.json").read_text())
  if jinja_file:
    (d / "chat_template.jinja").write_text(template)
  else:
    config["chat_template"] = template
  (d / "tokenizer_config.json").write_text(json.dumps(config))
  return d


def hf_ids(d: pathlib.Path, messages) -> list[int]:
  out = transformers.AutoTokenizer.from_pretrained(str(d)).apply_chat_template(
      messages, add_generation_prompt=True, tokenize=True)
  return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("family", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_chat_ids_equal_transformers(tmp_path, family, conversation):
  d = tokenizer_dir(tmp_path, TEMPLATES[family])
  messages = CONVERSATIONS[conversation]
  tok = Tokenizer.from_dir(d)
  if (family, conversation) in SUPPORTED:
    with pytest.raises(JaxppError, match=r"^chat template: (System role|Conversation roles)"):
      tok.apply_chat_template(messages)
    return
  ids = tok.apply_chat_template(messages)
  assert ids == hf_ids(d, messages)
  bos = tok.token_to_id("<s>")
  assert ids.count(bos) == (family != "qwen")  # the template's own BOS, never a second one


def test_template_file_and_named_templates(tmp_path):
  """`chat_template.jinja` is read as transformers reads it; a list of named templates
  gives its "default"."""
  d = tokenizer_dir(tmp_path, TEMPLATES["llama3"], jinja_file=True)
  messages = CONVERSATIONS["system"]
  assert Tokenizer.from_dir(d).apply_chat_template(messages) == hf_ids(d, messages)
  named = ChatTemplate.from_dir(tokenizer_dir(tmp_path / "n", [
      dict(name="tool_use", template="x"), dict(name="default", template="{{ bos_token }}ok")]))
  assert named.render(messages) == "<s>ok"


def test_bad_conversations_and_templates(tmp_path):
  tok = Tokenizer.from_dir(tokenizer_dir(tmp_path, TEMPLATES["llama3"]))
  for bad, match in [("hello", "a conversation is a non-empty list"),
                     ([], "a conversation is a non-empty list"),
                     ([dict(role="user")], r"message 0: needs a string 'content'"),
                     ([dict(role="robot", content="x")], r"message 0: role 'robot' is not")]:
    with pytest.raises(JaxppError, match=match):
      tok.apply_chat_template(bad)
  with pytest.raises(JaxppError, match="not a valid Jinja template"):
    ChatTemplate("{% for %}")
  sneaky = ChatTemplate("{{ messages.__class__.__mro__ }}")  # the sandbox refuses it
  with pytest.raises(JaxppError, match="cannot render"):
    sneaky.render(CONVERSATIONS["user"])
  with pytest.raises(JaxppError, match="has no chat template"):
    Tokenizer.from_dir(TINY).apply_chat_template(CONVERSATIONS["user"])


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
  d = tokenizer_dir(tmp_path_factory.mktemp("chat"), TEMPLATES["llama3"])
  return d, jaxpp.LLM(d, dtype="float32", max_len=256)


def test_chat_greedy_equals_transformers(chat_llm):
  """The tiny trained model answers a chat prompt with transformers' greedy tokens."""
  import torch
  d, llm = chat_llm
  conversations = [CONVERSATIONS["user"], CONVERSATIONS["system"]]
  got = llm.chat(conversations, max_new_tokens=12)
  model = transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
  for conversation, completion in zip(conversations, got):
    ids = hf_ids(d, conversation)
    with torch.no_grad():
      out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                           eos_token_id=list(llm.config.eos_token_ids), pad_token_id=0)
    assert completion.token_ids == out[0, len(ids):].tolist()
    assert completion.prompt_tokens == len(ids)
  assert [c.token_ids for c in llm.chat(CONVERSATIONS["user"], max_new_tokens=12)] == [
      got[0].token_ids]  # one conversation alone is one prompt


def test_generate_fixed_slots_compile_once(chat_llm):
  """Batches of 1 to 9 prompts stream through the same slots: a second round of the same
  batch sizes compiles nothing; a single string is one prompt."""
  _, llm = chat_llm
  prompts = [f"ticket {i}: the export fails" for i in range(9)]
  for n in range(1, 10):
    assert len(llm.generate(prompts[:n], max_new_tokens=3)) == n
  with compile_cache.CompileClock() as clock:
    for n in range(1, 10):
      llm.generate(prompts[:n], max_new_tokens=3)
  assert clock.compiles == 0
  one, = llm.generate("hello world", max_new_tokens=3)
  assert one.prompt_tokens == len(llm.tokenizer.encode("hello world"))


def test_generate_length_policy(chat_llm):
  _, llm = chat_llm
  long_ids = [5] * 300
  with pytest.raises(JaxppError, match=r"prompt 1 has 300 tokens.*length_policy=\"truncate\""):
    llm.generate([[5, 6, 7], long_ids], max_new_tokens=4)
  short, cut = llm.generate([[5, 6, 7], long_ids], max_new_tokens=4, length_policy="truncate")
  assert short.truncated_tokens == 0 and cut.truncated_tokens == 300 - (256 - 4 + 1)
  assert cut.prompt_tokens == 256 - 4 + 1 and len(cut.token_ids) >= 1
  with pytest.raises(JaxppError, match="length_policy='drop'"):
    llm.generate(["x"], length_policy="drop")


def test_job_chat_prompts(tmp_path):
  """`job.prompt_format="chat"`: the filled template is the user message after the system
  prompt, ids as transformers gives them; a cut keeps the assistant's header."""
  d = tokenizer_dir(tmp_path, TEMPLATES["llama3"])
  tok = Tokenizer.from_dir(d)
  prompter = Prompter(tok, "Ticket:\n{text}\nSummary:", budget=200, prompt_format="chat",
                      system_prompt="Summarise in one line.")
  short = jobio.Ticket(line=1, id=1, key="1", text="printer jam", doc=dict(text="printer jam"))
  long = jobio.Ticket(line=2, id=2, key="2", text="word " * 400, doc=dict(text="word " * 400))
  assert prompter([short, long]) == [None, None]
  want = hf_ids(d, [dict(role="system", content="Summarise in one line."),
                    dict(role="user", content="Ticket:\nprinter jam\nSummary:")])
  assert short.prompt == want and short.truncated_tokens == 0
  tail = tok.encode("\nSummary:<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                    add_special_tokens=False)
  assert len(long.prompt) == 200 and long.prompt[-len(tail):] == tail
  assert long.truncated_tokens > 0 and long.prompt[0] == tok.token_to_id("<s>")
  with pytest.raises(JaxppError, match="prompt_format='chat' needs a chat template"):
    Prompter(Tokenizer.from_dir(TINY), "{text}", budget=60, prompt_format="chat")
