# Sourced by the *-run.sh scripts (from the repository root): the one nvcc build of a standalone kernel benchmark.
#   build_bench BINARY REPORT SOURCE... [-- LINK_FLAG...]
# compiles the sources in parallel into $out (BUILD_DIR, default /tmp/weft-bench), each with ptxas -v, gathers
# ptxas's register and spill report into $out/REPORT (printing the report of a source that failed), and links
# $out/BINARY; the caller then runs it unless BUILD_ONLY is set.
out=${BUILD_DIR:-/tmp/weft-bench}
mkdir -p "$out"

build_bench() {
  local binary=$1 report=$2
  shift 2
  local srcs=() link=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do srcs+=("$1"); shift; done
  if [ $# -gt 0 ]; then shift; link=("$@"); fi
  local pids=() objs=() reports=() src i failed=0
  for src in "${srcs[@]}"; do
    objs+=("$out/$(basename "$src").o")
    reports+=("$out/$(basename "$src").ptxas")
    nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I native/src ${NVCC_FLAGS:-} -Xptxas -v -c "$src" \
      -o "$out/$(basename "$src").o" 2> "$out/$(basename "$src").ptxas" &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || { cat "${reports[$i]}"; failed=1; }; done
  cat "${reports[@]}" > "$out/$report"
  [ "$failed" = 0 ] || exit 1
  nvcc -gencode arch=compute_90a,code=sm_90a "${objs[@]}" -o "$out/$binary" ${link[@]+"${link[@]}"}
}

