// Dataset index builders: the GPT sample index and the blending indices of weighted datasets.
//
// Both run without the GIL over plain arrays. Inputs are validated in Python (megalite/data/indices.py), which
// passes exactly the dtypes bound here; the checks left in C++ are the ones only the walk itself can see
// (document ids out of range, negative lengths, too few tokens).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using Int32Array = py::array_t<int32_t, py::array::c_style>;
using Int64Array = py::array_t<int64_t, py::array::c_style>;

// How many documents ahead the walk prefetches sequence lengths. The document index is read in order but the
// lengths it points at are scattered (the index is shuffled), so without prefetching each length is a cache miss.
constexpr int64_t kPrefetchDistance = 32;

// Number of samples of seq_length tokens (each with extra tokens borrowed from the next) in total_tokens.
int64_t count_samples(int64_t total_tokens, int64_t seq_length, int64_t extra, bool drop_last_partial) {
  const int64_t usable = total_tokens - extra;
  if (usable <= 0) return 0;
  return drop_last_partial ? usable / seq_length : (usable + seq_length - 1) / seq_length;
}

// The sample index: row k is (position in document_index, offset in that document) where sample k starts.
//
// Sample k covers stream positions [k * seq_length, (k + 1) * seq_length + extra) of the documents concatenated
// in document_index order. Row k + 1 is written at the first document whose end reaches the end of sample k,
// with offset = end - extra - document start, which is Megatron-LM's convention (for extra = 0 the offset may be
// one past the last token of that document). One pass over the document index; each document is touched once.
template <typename DocIndex>
Int64Array build_sample_index(const Int32Array& sequence_lengths,
                              const py::array_t<DocIndex, py::array::c_style>& document_index,
                              int64_t seq_length, int64_t num_epochs, int64_t tokens_per_epoch,
                              bool drop_last_partial_sequence, int64_t add_extra_token_to_sequence) {
  const int64_t extra = add_extra_token_to_sequence;
  const int64_t num_samples =
      count_samples(num_epochs * tokens_per_epoch, seq_length, extra, drop_last_partial_sequence);
  Int64Array result({num_samples + 1, int64_t{2}});
  int64_t* out = result.mutable_data();
  const int32_t* sizes = sequence_lengths.data();
  const DocIndex* docs = document_index.data();
  const uint64_t num_sizes = static_cast<uint64_t>(sequence_lengths.shape(0));
  const int64_t num_docs = document_index.shape(0);

  std::string error;  // set inside the GIL-free region, raised after it
  {
    py::gil_scoped_release release;
    out[0] = 0;
    out[1] = 0;
    int64_t next = 1;                            // next row to write
    int64_t end = seq_length + extra;            // stream position where sample next - 1 ends
    int64_t start = 0;                           // stream position of the current document's first token
    for (int64_t j = 0; j < num_docs && next <= num_samples; ++j) {
      if (j + kPrefetchDistance < num_docs) {
        const uint64_t ahead = static_cast<uint64_t>(docs[j + kPrefetchDistance]);
        if (ahead < num_sizes) __builtin_prefetch(sizes + ahead);
      }
      const uint64_t doc = static_cast<uint64_t>(docs[j]);  // a negative id wraps to a huge one
      const int64_t length = doc < num_sizes ? sizes[doc] : -1;
      if (length < 0) {
        error = doc < num_sizes ? "sequence_lengths[" + std::to_string(doc) + "] is negative"
                                : "document_index[" + std::to_string(j) + "] = " + std::to_string(docs[j]) +
                                      " is not a sequence id in [0, " + std::to_string(num_sizes) + ")";
        break;
      }
      const int64_t stop = start + length;
      // The common case, at most one sample ending in this document, runs without a data-dependent branch
      // (one would be mispredicted at random, and `end` is carried from document to document): write the row
      // as if a sample ended here (row `next` exists while next <= num_samples) and keep it only if one did.
      out[2 * next] = j;
      out[2 * next + 1] = end - extra - start;
      const int64_t ends_here = end <= stop;
      next += ends_here;
      end += seq_length & -ends_here;
      if (__builtin_expect(end <= stop, 0)) {
        for (; end <= stop && next <= num_samples; ++next, end += seq_length) {  // documents longer than a sample
          out[2 * next] = j;
          out[2 * next + 1] = end - extra - start;
        }
      }
      start = stop;
    }
    if (error.empty() && next == num_samples && !drop_last_partial_sequence && num_docs > 0) {
      // The last, partial sample ends with the stream: Megatron-LM records (last document, its length - extra).
      out[2 * next] = num_docs - 1;
      out[2 * next + 1] = sizes[docs[num_docs - 1]] - extra;
      ++next;
    }
    if (error.empty() && next <= num_samples) {
      error = "document_index holds " + std::to_string(start) + " tokens, fewer than the " +
              std::to_string(num_epochs * tokens_per_epoch) + " (num_epochs * tokens_per_epoch) that " +
              std::to_string(num_samples) + " samples need";
    }
  }
  if (!error.empty()) throw std::invalid_argument(error);
  return result;
}

// Blending: sample i goes to the dataset furthest below its share, weight * max(i, 1) - samples given so far
// (ties to the lowest dataset id); returns (dataset id per sample, sample id within that dataset).
py::tuple build_blending_indices(const py::array_t<double, py::array::c_style>& weights, int64_t size) {
  const int64_t num_datasets = weights.shape(0);
  py::array_t<int16_t> dataset_index(size);
  Int64Array dataset_sample_index(size);
  int16_t* which = dataset_index.mutable_data();
  int64_t* within = dataset_sample_index.mutable_data();
  const double* w = weights.data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> taken(num_datasets, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double target = std::max(static_cast<double>(i), 1.0);
      int64_t best = 0;
      double best_error = w[0] * target - static_cast<double>(taken[0]);
      for (int64_t d = 1; d < num_datasets; ++d) {
        const double error = w[d] * target - static_cast<double>(taken[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      which[i] = static_cast<int16_t>(best);
      within[i] = taken[best]++;
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

template <typename DocIndex>
void bind_sample_index(py::module_& m) {
  m.def("build_sample_index", &build_sample_index<DocIndex>,
        "GPT sample index (int64 [num_samples + 1, 2]: position in document_index, offset in that document); "
        "use megalite.data.build_sample_index, which validates the arguments.",
        py::arg("sequence_lengths").noconvert(), py::arg("document_index").noconvert(), py::arg("seq_length"),
        py::arg("num_epochs"), py::arg("tokens_per_epoch"), py::arg("drop_last_partial_sequence"),
        py::arg("add_extra_token_to_sequence"));
}

}  // namespace

void register_helpers(py::module_& m) {
  m.def("build_info", []() { return std::string("megalite C++17 index builder"); },
        "Return a short string proving the extension was built.");
  bind_sample_index<int32_t>(m);  // Megatron-LM's document index dtype
  bind_sample_index<int64_t>(m);
  m.def("build_blending_indices", &build_blending_indices,
        "Blending indices (int16 dataset id, int64 sample id per sample); use megalite.data.build_blending_indices.",
        py::arg("weights").noconvert(), py::arg("size"));
}
