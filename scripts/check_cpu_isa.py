"""Checks that a built mtp_ext library runs on any x86-64 CPU: no code that a CPU without AVX2
(or without AVX-512) may execute uses those instructions.

The row kernels are compiled three times (csrc/cpu/kernels, setup.py): DEFAULT, AVX2 and
AVX512, each in its namespace (mtp::cpu::AVX2::..., at::vec::AVX2::...). Code they share with
the rest (inline functions and templates of common headers) is emitted by each compilation and
the linker keeps one copy, so a copy compiled for AVX-512 could end up called from the baseline
code. This reads the disassembly (objdump), gives each function the lowest capability of the
code that may call it (a function outside the capability namespaces that nothing in the library
calls directly, or whose address is taken, may run anywhere), and lists every function whose
instructions need more than that.

    python scripts/check_cpu_isa.py [path/to/_C.so]   # exit status 1 and the list if any
"""
import re
import subprocess
import sys

LEVELS = ("base", "AVX2", "AVX512")
FUNC = re.compile(r"^([0-9a-f]+) <(.+)>:$")
TARGET = re.compile(r"\s([0-9a-f]+) <[^\n]*>\s*$")  # "call 63450 <name>", "lea ... # 63450 <name>"


def namespace_level(name):
    if "AVX512::" in name:
        return 2
    if "AVX2::" in name:
        return 1
    return None


def needs(ins):
    """The capability an instruction needs: 2 for EVEX (zmm, mask registers), 1 for VEX."""
    ins = re.sub(r"<.*>", "", ins.split("#")[0])  # without the symbol names objdump adds
    mnemonic = ins.split()[0] if ins.split() else ""
    if "zmm" in ins or re.search(r"%k[0-7]\b", ins) or re.match(r"k(mov|and|or|not|shift|test|add|unpck|xor|xnor)", mnemonic):
        return 2
    if mnemonic.startswith("v") or "ymm" in ins:
        return 1
    return 0


def parse(path):
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", path], check=True,
                         capture_output=True, text=True).stdout
    # by address: local copies (".constprop" clones, static functions) may share a name
    funcs, fn = {}, None
    for line in out.splitlines():
        m = FUNC.match(line)
        if m:
            fn = int(m.group(1), 16)
            funcs[fn] = {"name": m.group(2), "need": 0, "example": "", "calls": set(),
                         "refs": set()}
            continue
        parts = line.split("\t")
        if fn is None or len(parts) < 2:
            continue
        ins = "\t".join(parts[1:]).strip()
        f = funcs[fn]
        n = needs(ins)
        if n > f["need"]:
            f["need"], f["example"] = n, ins
        t = TARGET.search(ins)
        if t and "+0x" not in t.group(0):
            kind = "calls" if re.match(r"(call|jmp)", ins) else "refs"
            f[kind].add(int(t.group(1), 16))
    return funcs


def check(path):
    funcs = parse(path)
    callers, taken = {}, set()
    for name, f in funcs.items():
        for c in f["calls"]:
            callers.setdefault(c, set()).add(name)
        taken |= f["refs"]
    level, fixed = {}, {a: namespace_level(f["name"]) for a, f in funcs.items()}
    for a in funcs:
        if fixed[a] is not None:
            level[a] = fixed[a]
        elif a not in callers or a in taken:
            level[a] = 0
        else:
            level[a] = 2  # lowered below by its callers
    changed = True
    while changed:
        changed = False
        for a, f in funcs.items():
            for c in f["calls"]:
                if c in level and fixed[c] is None and level[a] < level[c]:
                    level[c] = level[a]
                    changed = True
    bad = [(a, f) for a, f in funcs.items() if f["need"] > level[a]]
    for a, f in bad:
        print(f"{LEVELS[level[a]]} code may call {f['name'][:200]}, which uses "
              f"{LEVELS[f['need']]}: {f['example']}")
    print(f"{path}: {len(funcs)} functions, {sum(1 for a in funcs if level[a] == 0)} may run on any "
          f"x86-64 CPU; {len(bad)} need more than the code that may call them")
    return not bad


if __name__ == "__main__":
    if len(sys.argv) > 1:
        lib = sys.argv[1]
    else:
        import mtp_ext._C
        lib = mtp_ext._C.__file__
    sys.exit(0 if check(lib) else 1)
