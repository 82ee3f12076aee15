#!/usr/bin/env bash
# A kernel's machine code (SASS) on a machine with no GPU: how many instructions of each kind a kernel has, and where
# its mma sit among them, read before any device time is spent (run from the repository root):
#   bench/kernels/sass.sh SOURCE.cu [KERNEL_REGEX] [--dump FILE]
# compiles SOURCE for sm_90a (as build-bench.sh does), disassembles it, and prints per kernel whose mangled name
# matches KERNEL_REGEX (default: every kernel) its instruction count, the mma count and the top opcodes; --dump writes
# the matching kernels' SASS to FILE.
# The disassembler: cuobjdump from PATH where the CUDA toolkit has one. Where it has none (the nvcc-only toolkit of
# the development machines), Debian's nvidia-cuda-toolkit (11.8, from its non-free component, fetched once into
# $SASS_TOOLS, default ~/.cache/weft-sass) disassembles sm_90 after the cubin's ELF header is rewritten to the layout
# 11.8 reads (ABI version 7, e_flags sm_90): CUDA 12.8 changed that header, not the instruction encoding, which is
# the hardware's.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { sed -n '4,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
src=$1; shift
pattern=.; dump=
while [ $# -gt 0 ]; do
  case $1 in
    --dump) dump=$2; shift 2 ;;
    *) pattern=$1; shift ;;
  esac
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt's download user reads it
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I native/src ${NVCC_FLAGS:-} -cubin -o "$work/k.cubin" "$src"

disassemble() {  # cubin -> SASS text on stdout
  if command -v cuobjdump > /dev/null && cuobjdump -sass "$1" 2> /dev/null; then return; fi
  local tools=${SASS_TOOLS:-$HOME/.cache/weft-sass}
  if [ ! -x "$tools/usr/bin/nvdisasm" ]; then
    echo "sass.sh: fetching Debian's nvidia-cuda-toolkit (non-free) for nvdisasm into $tools" >&2
    local apt=$work/apt
    mkdir -p "$apt/lists/partial" "$tools"
    sed 's/^Components: .*/Components: main non-free/' /etc/apt/sources.list.d/debian.sources > "$apt/debian.sources"
    local opts=(-o Dir::Etc::sourcelist=/dev/null -o Dir::Etc::sourceparts="$apt" -o Dir::State::Lists="$apt/lists")
    apt-get "${opts[@]}" update -qq
    (cd "$apt" && apt-get "${opts[@]}" download -qq nvidia-cuda-toolkit 2> /dev/null)
    dpkg -x "$apt"/nvidia-cuda-toolkit_*.deb "$apt/x"
    cp -a "$apt/x/usr/bin/nvdisasm" --parents "$tools" 2> /dev/null || { mkdir -p "$tools/usr/bin"; cp "$apt/x/usr/bin/nvdisasm" "$tools/usr/bin/"; }
  fi
  python3 - "$1" "$work/k11.cubin" << 'EOF'
import struct, sys
elf = bytearray(open(sys.argv[1], 'rb').read())
elf[8] = 7                                   # EI_ABIVERSION as CUDA 11 wrote it
struct.pack_into('<I', elf, 0x30, 0x5a055a)  # e_flags: sm_90, virtual arch 90, 64-bit, unified texture mode
open(sys.argv[2], 'wb').write(elf)
EOF
  "$tools/usr/bin/nvdisasm" -c "$work/k11.cubin"
}

disassemble "$work/k.cubin" > "$work/k.sass"
# One block per kernel: from its .text (nvdisasm) or Function (cuobjdump) line to the next.
python3 - "$work/k.sass" "$pattern" "${dump:-}" << 'EOF'
import collections, re, sys
path, pattern, dump = sys.argv[1], re.compile(sys.argv[2]), sys.argv[3]
kernels, name = {}, None
for line in open(path):
    m = re.match(r'^\s*(?:\.text\.|Function : )(\S+?):?\s*$', line)
    if m:
        name = m.group(1)
        kernels[name] = []
    elif name:
        kernels[name].append(line)
out = open(dump, 'w') if dump else None
for name, lines in kernels.items():
    if name.startswith('$') or not pattern.search(name):
        continue
    ops = [m.group(1).split('.')[0] for m in
           (re.match(r'^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)', l) for l in lines) if m]
    count = collections.Counter(ops)
    mma = count['HMMA'] + count['IMMA']
    top = ', '.join(f'{op} {n}' for op, n in count.most_common(12))
    # The basic blocks (between labels) that hold an mma: their instructions a mma is the hot loop's cost.
    blocks, hot, hot_mma = [[]], 0, 0
    for l in lines:
        if re.match(r'^\s*\.L\w*:', l):
            blocks.append([])
        m = re.match(r'^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)', l)
        if m:
            blocks[-1].append(m.group(1).split('.')[0])
    for b in blocks:
        n = sum(op in ('HMMA', 'IMMA') for op in b)
        if n:
            hot, hot_mma = hot + len(b), hot_mma + n
    per = f', {hot / hot_mma:.2f} instructions a mma in the blocks that hold them ({hot} for {hot_mma})' if hot_mma else ''
    print(f'{name}: {len(ops)} instructions, {mma} mma ({count["HMMA"]} HMMA, {count["IMMA"]} IMMA){per}\n  {top}')
    if out:
        out.write(f'// {name}\n' + ''.join(lines))
EOF
