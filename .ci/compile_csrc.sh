#!/usr/bin/env bash
# Compile-only check of the CUDA extension sources in csrc/ (no GPU needed):
#   every csrc/*.cu with nvcc for sm_90 (-c, object to a temp dir), every csrc/*.cpp with the host
#   compiler, both with torch's include paths, its C++ ABI flag and the nvcc flags that
#   torch.utils.cpp_extension.CUDAExtension adds, so a syntax or type error fails here.
# One line per file. Then the objects are linked into _C.so and loaded (.ci/check_extension.py: symbols,
# schemas against the CPU tests' twin ops, the fakes). Exit 1 on any failure, or when nvcc is absent unless
# STOP_KERNELS_SKIP_NVCC=1.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
NVCC=${NVCC:-nvcc}
ARCH=${STOP_KERNELS_CI_ARCH:-sm_90}

if ! command -v "$NVCC" >/dev/null 2>&1; then
  if [ "${STOP_KERNELS_SKIP_NVCC:-0}" = "1" ]; then
    echo "compile_csrc: nvcc not found; skipping the CUDA compile check (STOP_KERNELS_SKIP_NVCC=1)"
    exit 0
  fi
  echo "compile_csrc: nvcc not found on PATH: cannot compile csrc/*.cu (set STOP_KERNELS_SKIP_NVCC=1 to skip)" >&2
  exit 1
fi

# torch's include paths, python's, the C++ ABI and the common nvcc flags of CUDAExtension
eval "$("$PY" - <<'PYEOF' 2>/dev/null
import sysconfig, torch
from torch.utils import cpp_extension as ce
inc = [p for p in ce.include_paths() ]
inc.append(sysconfig.get_paths()["include"])
print("INCS='" + " ".join("-I" + p for p in inc) + "'")
print("ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
print("COMMON='" + " ".join(ce.COMMON_NVCC_FLAGS) + "'")
import inspect
# the C++ standard that this torch's cpp_extension builds with (C++20 from torch 2.10 on, else C++17)
print("STD=" + ("c++20" if "-std=c++20" in inspect.getsource(ce) else "c++17"))
PYEOF
)"
if [ -z "${INCS:-}" ]; then
  echo "compile_csrc: could not query torch's include paths (is torch installed for $PY?)" >&2
  exit 1
fi
# CUDA headers for the host compiler (bindings.cpp needs none, but torch/extension.h may): the
# directory of the real nvcc binary, found through nvcc's own dry run.
CUDA_INC=$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="\(-I[^ "]*\).*/\1/p' | head -1)

OUT=$(mktemp -d /tmp/compile_csrc.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
DEFS="-DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=$ABI"
fail=0
start=$(date +%s)

# one background job per source file (they are independent); each writes its log and status
compile_one() {  # $1 = source file; prints its one-line result, returns the compiler's status
  local f=$1 t0 log rc tool
  t0=$(date +%s)
  case "$f" in
    *.cu)  tool="nvcc -arch=$ARCH -std=$STD"
           log=$("$NVCC" -c "$f" -o "$OUT/$(basename "$f").o" -arch="$ARCH" -std=$STD -O3 -lineinfo \
                 -Xcompiler -fPIC $COMMON $DEFS $INCS -Icsrc 2>&1); rc=$? ;;
    *.cpp) tool="${CXX:-g++} -std=$STD"
           log=$(${CXX:-g++} -c "$f" -o "$OUT/$(basename "$f").o" -std=$STD -O1 -fPIC $DEFS $INCS $CUDA_INC \
                 -Icsrc 2>&1); rc=$? ;;
  esac
  if [ $rc = 0 ]; then
    echo "ok    $f  ($(( $(date +%s) - t0 )) s, $tool)"
    echo "$log" | grep -E "csrc/.*[Ww]arning" | head -20   # our own warnings, not failures
  else
    echo "FAIL  $f  ($tool)"; echo "$log" | head -60
  fi
  return $rc
}

pids=(); files=()
for f in csrc/*.cu csrc/*.cpp; do
  [ -e "$f" ] || continue
  compile_one "$f" > "$OUT/$(basename "$f").log" 2>&1 &
  pids+=($!); files+=("$f")
done
if [ ${#files[@]} = 0 ]; then
  echo "compile_csrc: no csrc/*.cu or csrc/*.cpp found" >&2; exit 1
fi
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || fail=1
  cat "$OUT/$(basename "${files[$i]}").log"
done

# link the objects as torch.utils.cpp_extension would and load the library (no GPU needed): an unresolved
# symbol, or an m.impl whose C++ signature differs from its m.def schema, fails at load; the schemas must
# also be those of the Python twin the CPU tests run (.ci/check_extension.py)
if [ $fail = 0 ]; then
  TORCH_LIB=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
  if log=$("$NVCC" -shared "$OUT"/*.o -o "$OUT/_C.so" -L"$TORCH_LIB" -lc10 -lc10_cuda -ltorch -ltorch_cpu \
           -ltorch_cuda -ltorch_python -lcudart -Xlinker -rpath -Xlinker "$TORCH_LIB" 2>&1); then
    echo "ok    link _C.so"
    "$PY" .ci/check_extension.py "$OUT/_C.so" || fail=1
  else
    echo "FAIL  link _C.so"; echo "$log" | head -30; fail=1
  fi
fi

echo "compile_csrc: $( [ $fail = 0 ] && echo passed || echo FAILED ) in $(( $(date +%s) - start )) s"
exit $fail
