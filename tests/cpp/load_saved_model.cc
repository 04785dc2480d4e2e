// Loads a SavedModel with the TensorFlow C++ API (as TF Serving does), runs one signature and
// writes its outputs. Used by tests/test_export.py to check that the export needs no Python.
//
// Usage: load_saved_model SAVED_MODEL_DIR SIGNATURE IN_DIR OUT_DIR
//   IN_DIR holds one file per signature input, named after the input key; OUT_DIR receives one
//   file per output key. File format (little-endian): int64 rank, int64 dims[rank], float32 data.
// Exit status: 0 on success; 1 on bad usage or I/O; 2 when TensorFlow fails, after printing
// "STATUS <code name>: <message>" on stderr (e.g. INVALID_ARGUMENT for a wrong input shape).

#include <cstdint>
#include <fstream>
#include <iostream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "tensorflow/cc/saved_model/loader.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/public/session_options.h"

namespace {

// The pip wheel ships no tag_constants.h; "serve" is tf.saved_model.SERVING.
constexpr char kServeTag[] = "serve";

bool ReadTensor(const std::string& path, tensorflow::Tensor* tensor) {
  std::ifstream in(path, std::ios::binary);
  int64_t rank = 0;
  if (!in.read(reinterpret_cast<char*>(&rank), sizeof(rank)) || rank < 0 || rank > 8) return false;
  std::vector<int64_t> dims(rank);
  if (!in.read(reinterpret_cast<char*>(dims.data()), rank * sizeof(int64_t))) return false;
  tensorflow::TensorShape shape;
  for (int64_t d : dims) {
    if (!shape.AddDimWithStatus(d).ok()) return false;
  }
  *tensor = tensorflow::Tensor(tensorflow::DT_FLOAT, shape);
  auto flat = tensor->flat<float>();
  return static_cast<bool>(
      in.read(reinterpret_cast<char*>(flat.data()), flat.size() * sizeof(float)));
}

bool WriteTensor(const std::string& path, const tensorflow::Tensor& tensor) {
  if (tensor.dtype() != tensorflow::DT_FLOAT) return false;
  std::ofstream out(path, std::ios::binary);
  const int64_t rank = tensor.dims();
  out.write(reinterpret_cast<const char*>(&rank), sizeof(rank));
  for (int i = 0; i < rank; ++i) {
    const int64_t d = tensor.dim_size(i);
    out.write(reinterpret_cast<const char*>(&d), sizeof(d));
  }
  auto flat = tensor.flat<float>();
  out.write(reinterpret_cast<const char*>(flat.data()), flat.size() * sizeof(float));
  return static_cast<bool>(out);
}

int Fail(const absl::Status& status) {
  std::cerr << "STATUS " << absl::StatusCodeToString(status.code()) << ": " << status.message()
            << std::endl;
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: " << argv[0] << " SAVED_MODEL_DIR SIGNATURE IN_DIR OUT_DIR" << std::endl;
    return 1;
  }
  const std::string model_dir = argv[1], signature_name = argv[2], in_dir = argv[3],
                    out_dir = argv[4];

  tensorflow::SavedModelBundle bundle;
  absl::Status status = tensorflow::LoadSavedModel(tensorflow::SessionOptions(),
                                                   tensorflow::RunOptions(), model_dir,
                                                   {kServeTag}, &bundle);
  if (!status.ok()) return Fail(status);

  const auto& signatures = bundle.meta_graph_def.signature_def();
  auto found = signatures.find(signature_name);
  if (found == signatures.end()) {
    std::cerr << "no signature " << signature_name << " in " << model_dir << std::endl;
    return 1;
  }
  const tensorflow::SignatureDef& signature = found->second;

  std::vector<std::pair<std::string, tensorflow::Tensor>> feeds;
  for (const auto& [key, info] : signature.inputs()) {
    tensorflow::Tensor tensor;
    if (!ReadTensor(in_dir + "/" + key, &tensor)) {
      std::cerr << "cannot read input " << in_dir << "/" << key << std::endl;
      return 1;
    }
    feeds.emplace_back(info.name(), std::move(tensor));
  }
  std::vector<std::string> keys, fetches;
  for (const auto& [key, info] : signature.outputs()) {
    keys.push_back(key);
    fetches.push_back(info.name());
  }

  std::vector<tensorflow::Tensor> outputs;
  status = bundle.session->Run(feeds, fetches, {}, &outputs);
  if (!status.ok()) return Fail(status);

  for (size_t i = 0; i < keys.size(); ++i) {
    if (!WriteTensor(out_dir + "/" + keys[i], outputs[i])) {
      std::cerr << "cannot write output " << out_dir << "/" << keys[i] << std::endl;
      return 1;
    }
  }
  return 0;
}
