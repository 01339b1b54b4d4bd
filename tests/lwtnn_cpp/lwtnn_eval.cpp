// lwtnn_eval.cpp -- an independent C++ evaluation of an lwtnn *graph* JSON with lwtnn's semantics.
//
// Standalone (C++17 standard library only; lwtnn itself needs Boost and Eigen): a small JSON reader and
// the parts of lwtnn a calokit generator uses -- input nodes with (x + offset) * scale, concatenate and
// feed_forward nodes, dense layers (row-major n_out x n_in weights, bias, activation) and normalization
// layers (W * (x + b)), activations linear, rectified, sigmoid (0/1 beyond |x| > 30), tanh, softmax,
// hard_sigmoid, abs, elu, leakyrelu, swish (x * sigmoid(alpha x)). Missing keys are errors, as in lwtnn's
// parser: a dense layer without activation, an activation object without alpha, a node without sources.
//
//   g++ -O2 -std=c++17 -o lwtnn_eval lwtnn_eval.cpp
//   ./lwtnn_eval GRAPH.json INPUTS.txt > OUTPUTS.txt
//
// INPUTS.txt: the number of events, then per event the values of all input variables, input nodes in
// the order of the graph's "inputs". OUTPUTS.txt: per event one line with the first output's values.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using Vec = std::vector<double>;

struct Json {
  enum Kind { NUL, BOOL, NUM, STR, ARR, OBJ } kind = NUL;
  double num = 0;
  std::string str;
  std::vector<Json> arr;
  std::map<std::string, Json> obj;
  const Json& at(const std::string& key) const {
    auto it = obj.find(key);
    if (kind != OBJ || it == obj.end()) throw std::runtime_error("missing key '" + key + "'");
    return it->second;
  }
  bool has(const std::string& key) const { return kind == OBJ && obj.count(key); }
  double number() const {
    if (kind != NUM) throw std::runtime_error("expected a number");
    return num;
  }
  const std::string& string() const {
    if (kind != STR) throw std::runtime_error("expected a string");
    return str;
  }
  const std::vector<Json>& array() const {
    if (kind != ARR) throw std::runtime_error("expected an array");
    return arr;
  }
};

class Reader {
 public:
  explicit Reader(const std::string& text) : s_(text) {}
  Json parse() {
    Json v = value();
    space();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;
  void fail(const std::string& what) { throw std::runtime_error("JSON: " + what + " at " + std::to_string(i_)); }
  void space() { while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_; }
  bool eat(char c) { space(); if (i_ < s_.size() && s_[i_] == c) { ++i_; return true; } return false; }
  void expect(char c) { if (!eat(c)) fail(std::string("expected '") + c + "'"); }
  std::string text() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\') { ++i_; if (i_ >= s_.size()) fail("bad escape"); }
      out += s_[i_++];
    }
    if (i_ >= s_.size()) fail("unterminated string");
    ++i_;
    return out;
  }
  Json value() {
    Json v;
    space();
    if (i_ >= s_.size()) fail("unexpected end");
    char c = s_[i_];
    if (c == '{') {
      v.kind = Json::OBJ; ++i_;
      if (eat('}')) return v;
      do { std::string k = text(); expect(':'); v.obj[k] = value(); } while (eat(','));
      expect('}');
    } else if (c == '[') {
      v.kind = Json::ARR; ++i_;
      if (eat(']')) return v;
      do { v.arr.push_back(value()); } while (eat(','));
      expect(']');
    } else if (c == '"') {
      v.kind = Json::STR; v.str = text();
    } else if (s_.compare(i_, 4, "true") == 0 || s_.compare(i_, 5, "false") == 0) {
      v.kind = Json::BOOL; i_ += (s_[i_] == 't') ? 4 : 5;
    } else if (s_.compare(i_, 4, "null") == 0) {
      i_ += 4;
    } else {
      const char* start = s_.c_str() + i_;
      char* end = nullptr;
      v.kind = Json::NUM; v.num = std::strtod(start, &end);
      if (end == start) fail("bad value");
      i_ += static_cast<size_t>(end - start);
    }
    return v;
  }
};

// ---------------------------------------------------------------------------------------------
// activations, as lwtnn defines them

struct Activation { std::string fn; double alpha; };

Activation get_activation(const Json& a) {
  if (a.kind == Json::OBJ) return {a.at("function").string(), a.at("alpha").number()};
  const std::string& fn = a.string();
  return {fn, fn == "elu" ? 1.0 : NAN};   // plain strings: no alpha (NaN), except legacy elu = 1
}

double sigmoid(double x) {
  if (x < -30.0) return 0.0;
  if (x > 30.0) return 1.0;
  return 1.0 / (1.0 + std::exp(-x));
}

Vec activate(const Activation& a, Vec x) {
  if (a.fn == "linear") return x;
  if (a.fn == "softmax") {
    double mx = x[0], sum = 0;
    for (double v : x) mx = std::max(mx, v);
    for (double& v : x) { v = std::exp(v - mx); sum += v; }
    for (double& v : x) v /= sum;
    return x;
  }
  for (double& v : x) {
    if (a.fn == "rectified") v = (std::isnan(v) || v > 0) ? v : 0.0;
    else if (a.fn == "sigmoid") v = sigmoid(v);
    else if (a.fn == "tanh") v = std::tanh(v);
    else if (a.fn == "hard_sigmoid") v = std::min(1.0, std::max(0.0, 0.2 * v + 0.5));
    else if (a.fn == "abs") v = std::fabs(v);
    else if (a.fn == "elu") v = v >= 0 ? v : a.alpha * (std::exp(v) - 1);
    else if (a.fn == "leakyrelu") v = v > 0 ? v : a.alpha * v;
    else if (a.fn == "swish") v = v * sigmoid(a.alpha * v);
    else throw std::runtime_error("activation function " + a.fn + " not recognized");
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
// the graph

Vec numbers(const Json& j) {
  Vec out;
  for (const Json& v : j.array()) out.push_back(v.number());
  return out;
}

Vec apply_layer(const Json& layer, const Vec& x) {
  const std::string arch = layer.at("architecture").string();
  Vec w = numbers(layer.at("weights")), b = numbers(layer.at("bias"));
  if (arch == "normalization") {
    if (w.size() != x.size() || b.size() != x.size()) throw std::runtime_error("normalization size mismatch");
    Vec out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = w[i] * (x[i] + b[i]);
    return out;
  }
  if (arch != "dense") throw std::runtime_error("architecture " + arch + " not handled");
  if (!layer.has("activation")) throw std::runtime_error("dense layer without activation");
  Vec out = x;
  if (!w.empty()) {
    if (w.size() % x.size()) throw std::runtime_error("weights not divisible by inputs");
    size_t n_out = w.size() / x.size();
    out.assign(n_out, 0.0);
    for (size_t r = 0; r < n_out; ++r)
      for (size_t c = 0; c < x.size(); ++c) out[r] += w[c + r * x.size()] * x[c];
  }
  if (!b.empty()) {
    if (b.size() != out.size()) throw std::runtime_error("bias size mismatch");
    for (size_t i = 0; i < out.size(); ++i) out[i] += b[i];
  }
  return activate(get_activation(layer.at("activation")), out);
}

struct Graph {
  const Json& g;
  std::vector<Vec> inputs;           // per input node, already (x + offset) * scale
  std::map<size_t, Vec> cache;
  Vec node(size_t i) {
    if (cache.count(i)) return cache[i];
    const auto& nodes = g.at("nodes").array();
    if (i >= nodes.size()) throw std::runtime_error("no node index " + std::to_string(i));
    const Json& n = nodes[i];
    const std::string type = n.at("type").string();
    const auto& src = n.at("sources").array();
    Vec out;
    if (type == "input") {
      size_t k = static_cast<size_t>(src.at(0).number());
      out = inputs.at(k);
      if (out.size() != static_cast<size_t>(n.at("size").number())) throw std::runtime_error("input size mismatch");
    } else if (type == "concatenate") {
      for (const Json& s : src) { Vec v = node(static_cast<size_t>(s.number())); out.insert(out.end(), v.begin(), v.end()); }
    } else if (type == "feed_forward") {
      if (src.size() != 1) throw std::runtime_error("need one source");
      const auto& layers = g.at("layers").array();
      size_t li = static_cast<size_t>(n.at("layer_index").number());
      out = apply_layer(layers.at(li), node(static_cast<size_t>(src[0].number())));
    } else {
      throw std::runtime_error("node type " + type + " not handled");
    }
    return cache[i] = out;
  }
};

int main(int argc, char** argv) {
  if (argc != 3) { std::fprintf(stderr, "usage: lwtnn_eval GRAPH.json INPUTS.txt\n"); return 2; }
  try {
    std::ifstream jf(argv[1]);
    std::stringstream buf;
    buf << jf.rdbuf();
    std::string text = buf.str();
    Json g = Reader(text).parse();
    for (const char* key : {"inputs", "input_sequences", "nodes", "layers", "outputs"}) g.at(key);
    const auto& outputs = g.at("outputs").obj;
    if (outputs.empty()) throw std::runtime_error("no outputs");
    const Json& out = outputs.begin()->second;
    size_t out_node = static_cast<size_t>(out.at("node_index").number());
    size_t n_labels = out.at("labels").array().size();

    std::ifstream in(argv[2]);
    long n_events = 0;
    if (!(in >> n_events)) throw std::runtime_error("cannot read the number of events");
    for (long e = 0; e < n_events; ++e) {
      Graph graph{g, {}, {}};
      for (const Json& inp : g.at("inputs").array()) {
        inp.at("name").string();
        Vec x;
        for (const Json& var : inp.at("variables").array()) {
          var.at("name").string();
          double v;
          if (!(in >> v)) throw std::runtime_error("input file too short");
          x.push_back((v + var.at("offset").number()) * var.at("scale").number());
        }
        graph.inputs.push_back(x);
      }
      Vec y = graph.node(out_node);
      if (y.size() != n_labels) throw std::runtime_error("output size != number of labels");
      for (size_t i = 0; i < y.size(); ++i) std::printf(i ? " %.17g" : "%.17g", y[i]);
      std::printf("\n");
    }
  } catch (const std::exception& err) {
    std::fprintf(stderr, "lwtnn_eval: %s\n", err.what());
    return 1;
  }
  return 0;
}
