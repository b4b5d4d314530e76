#include "switches.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <mutex>

#include <torch/library.h>

namespace mtp {
namespace {

struct SwitchInfo {
  const char* name;
  const char* env;
  std::vector<std::string> choices;  // choices[0] == "auto"
};

const std::vector<SwitchInfo>& infos() {
  static const std::vector<SwitchInfo> all = {
      {"cpu_capability", "MTP_EXT_CPU_CAPABILITY", {"auto", "default", "avx2", "avx512"}},
      {"cpu_layout", "MTP_EXT_CPU_LAYOUT", {"auto", "vocab", "row"}},
      {"cpu_dw16", "MTP_EXT_CPU_DW16", {"auto", "mkl", "slabs"}},
      {"cuda_dw16", "MTP_EXT_CUDA_DW_SLABS", {"auto", "slabs"}},
      {"cpu_gemm16", "MTP_EXT_CPU_GEMM16", {"auto", "native", "fp32"}},
  };
  return all;
}

std::atomic<int> values[5];
std::once_flag env_read;

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

int choice_index(const SwitchInfo& info, std::string value, const std::string& where) {
  value = lower(value);
  if (value.empty()) return 0;
  const auto& c = info.choices;
  const auto it = std::find(c.begin(), c.end(), value);
  TORCH_CHECK_VALUE(it != c.end(), "mtp_ext: ", where, " must be one of ", c10::Join(", ", c),
                    ", got ", value);
  return static_cast<int>(it - c.begin());
}

void read_environment() {
  for (size_t i = 0; i < infos().size(); ++i) {
    const SwitchInfo& info = infos()[i];
    const char* v = std::getenv(info.env);
    std::string value = v ? v : "";
    if (i == static_cast<size_t>(Switch::kCudaDw16)) {  // a flag: 1 forces the slabs
      value = value == "1" ? "slabs" : value == "0" ? "" : value;
    }
    values[i].store(choice_index(info, value, info.env));
  }
}

void ensure_read() { std::call_once(env_read, read_environment); }  // rethrows, retries next use

}  // namespace

int switch_value(Switch s) {
  ensure_read();
  return values[static_cast<int>(s)].load(std::memory_order_relaxed);
}

std::string set_switch(const std::string& name, const std::string& value) {
  ensure_read();
  for (size_t i = 0; i < infos().size(); ++i) {
    const SwitchInfo& info = infos()[i];
    if (name != info.name) continue;
    const int v = choice_index(info, value, "switch " + name);
    return info.choices[values[i].exchange(v)];
  }
  std::vector<std::string> names;
  for (const SwitchInfo& info : infos()) names.push_back(info.name);
  TORCH_CHECK_VALUE(false, "mtp_ext: no switch named ", name, " (one of ",
                    c10::Join(", ", names), ")");
}

std::vector<std::string> switch_settings() {
  ensure_read();
  std::vector<std::string> out;
  for (size_t i = 0; i < infos().size(); ++i) {
    out.push_back(std::string(infos()[i].name) + "=" + infos()[i].choices[values[i].load()]);
  }
  return out;
}

}  // namespace mtp

// No tensor argument, so no device to dispatch on: catch-all kernels.
TORCH_LIBRARY_FRAGMENT(mtp_ext, m) {
  m.def("_set_switch(str name, str value) -> str", &mtp::set_switch);
  m.def("_switches() -> str[]", &mtp::switch_settings);
}
