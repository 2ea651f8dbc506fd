# Source on the GPU machine from the repository root, with .devbundle sent along:
#   source bench/gpu_setup.sh
# Unpacks SGLang 0.5.17 (.devbundle/gpu_env.sh), the packed JIT kernel cache if present, and
# installs this project editable into the image's Python so SGLang's plugin loader finds it.
source .devbundle/gpu_env.sh || return 1
if [ -f .devbundle/jit-cache.tar.xz ] && [ ! -f "$TVM_FFI_CACHE_DIR/.unpacked" ]; then
  tar -xJf .devbundle/jit-cache.tar.xz -C "$TVM_FFI_CACHE_DIR" && touch "$TVM_FFI_CACHE_DIR/.unpacked"
fi
# PYTHONPATH off: the bundle's `kernels` package breaks setuptools' metadata step.
PYTHONPATH= python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Running pip" || true
python -c "import sglang_mixed_precision" || return 1
