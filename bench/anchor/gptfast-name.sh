# Sourced by bench/product.sh and bench/quant-anchor.sh: gpt-fast's config name for a bench/presets.ts preset (and
# --moe for its mixtral-moe tree), or nothing where gpt-fast has no such model.
gptfast_name() {
  case "$1" in
    llama-2-7b) echo Llama-2-7b-chat-hf ;;
    llama-3-8b) echo Meta-Llama-3-8B ;;
    mistral-7b) echo Mistral-7B ;;
    mixtral-8x7b) echo "Mixtral-8x7B-v0.1 --moe" ;;
    *) echo "" ;;
  esac
}
