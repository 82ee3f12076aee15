// weft::Error: the one exception type of the addon.
//
// Native code reports every failure by throwing weft::Error; it never aborts or exits. The binding
// (binding.cc, `guard`) is the single translation point: it turns a weft::Error into a JS Error whose
// `code` is 'WEFT_NATIVE' and whose `op` names the operation. Messages name the op, the parameter and
// the shapes, e.g. "matmul: x [3, 64] f32 and w [128, 32] bf16 do not match (expected w [N, 64])".
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace weft {

class Error : public std::runtime_error {
 public:
  // Kind::Type becomes a JS TypeError (an argument of the wrong JS type, a foreign object passed as a
  // tensor); Kind::Native a plain Error (shapes, dtypes, ranges, allocation, device errors).
  enum class Kind { Native, Type };

  Error(std::string op, const std::string& message, Kind kind = Kind::Native)
      : std::runtime_error(op + ": " + message), op_(std::move(op)), kind_(kind) {}

  const std::string& op() const { return op_; }
  Kind kind() const { return kind_; }

 private:
  std::string op_;
  Kind kind_;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}
}  // namespace detail

}  // namespace weft

// WEFT_CHECK(cond, op, parts...): throw weft::Error{op, concat(parts...)} unless cond holds.
#define WEFT_CHECK(cond, op, ...)                                             \
  do {                                                                        \
    if (!(cond)) throw ::weft::Error((op), ::weft::detail::concat(__VA_ARGS__)); \
  } while (0)

// WEFT_FAIL(op, parts...): throw unconditionally.
#define WEFT_FAIL(op, ...) throw ::weft::Error((op), ::weft::detail::concat(__VA_ARGS__))

// WEFT_TYPE_CHECK: like WEFT_CHECK, but the JS side sees a TypeError.
#define WEFT_TYPE_CHECK(cond, op, ...)                                                        \
  do {                                                                                        \
    if (!(cond))                                                                              \
      throw ::weft::Error((op), ::weft::detail::concat(__VA_ARGS__), ::weft::Error::Kind::Type); \
  } while (0)
