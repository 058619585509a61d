/* medsamix.h - v0.1.0 - MedSAMix model merging and Segment Anything on CPU
   https://github.com/ (this repository)                  MIT license, see end

   One header, no Python. It loads Segment Anything (SAM) checkpoints and
   fine-tuned specialists (MedSAM, MedicoSAM, ...) straight from PyTorch .pth
   or safetensors files, merges them layer group by layer group with Linear,
   Task Arithmetic, TIES or SLERP exactly as the MedSAMix reference code does,
   runs the SAM forward pass on oneDNN, and searches per-group merge plans with
   a random-forest Bayesian optimiser (expected improvement; ParEGO for several
   tasks) that maximises Dice on a few labelled calibration images.
   It does not train, does not run on GPUs, and does not read DICOM/NIfTI
   (convert slices to PNG first).

   USE
      #define MEDSAMIX_IMPLEMENTATION   in *one* C or C++ file, before
      #include "medsamix.h"             the include; elsewhere include only.
      Compile with -fopenmp and link -ldnnl -lstb -lm (Debian: libdnnl-dev,
      libstb-dev). Under a strict -std=c99 include medsamix.h before any
      system header in the implementation file (it needs _POSIX_C_SOURCE), or
      pass -D_POSIX_C_SOURCE=200809L.

   QUICK START (merge two specialists into SAM, segment one box)
      msx_checkpoint *base, *a, *b, *merged; msx_sam_arch arch;
      msx_sam_load("sam_vit_b.pth", NULL, &base, &arch);
      msx_sam_load("medsam.pth", NULL, &a, NULL);
      msx_sam_load("medicosam.pt", NULL, &b, NULL);
      const msx_checkpoint *ft[2] = {a, b};
      msx_plan *plan;   msx_plan_create(arch.depth, 3, 2, &plan);
      msx_group_plan g = {MSX_MERGE_TIES};  g.drop_rate = 0.2; g.scale = 0.5;
      msx_plan_set_uniform(plan, &g);
      msx_merger *mg;   msx_merger_create(base, ft, 2, 2, &mg);
      msx_ckpt_clone(base, &merged);
      msx_merger_run(mg, plan, merged, NULL);
      msx_sam *sam; msx_sam_ws *ws;
      msx_sam_create(merged, &arch, NULL, &sam); msx_sam_ws_create(sam, &ws);
      ... msx_image_load, msx_segment_box(sam, ws, &img, box, NULL, &mask) ...
      Every call returns msx_result; see examples/ for complete programs.

   CONFIGURATION (define before including the implementation)
      MSXDEF / MEDSAMIX_STATIC      linkage of the API (extern / static)
      MSX_MALLOC, MSX_REALLOC,      allocator; define all three or none
        MSX_FREE
      MSX_ASSERT(x)                 internal invariants only (never input)
      MSX_MAX_FILE_BYTES            largest file read (16 GiB)
      MSX_MAX_JSON_BYTES/_DEPTH     JSON size (256 MiB) and nesting (64)
      MSX_MAX_TENSORS               tensors per checkpoint (100000)
      MSX_MAX_DIMS                  tensor rank (4); set before every include
      MSX_MAX_MODELS                base + fine-tuned models per merge (8)
      MSX_NO_STB_IMAGE              leave out image file I/O (no libstb)

   THREAD SAFETY
      Loaded checkpoints, msx_sam models, mergers' inputs and search spaces
      are read-only once built and may be shared by any number of threads.
      A workspace (msx_sam_ws), a merger and an optimiser belong to one thread
      at a time. Each call parallelises internally with OpenMP; to run several
      evaluations at once give each its own workspace and set
      msx_sam_options.n_threads so that the threads add up to the cores.
      msx_last_error() is per thread.

   OWNERSHIP
      Every *_create / *_load has exactly one matching *_free, which accepts
      NULL. An msx_sam borrows the checkpoint it was built from: keep the
      checkpoint alive, and call msx_sam_refresh after changing its weights.
      Strings returned through char ** are freed with msx_free.

   ERRORS
      Calls return msx_result (MSX_OK = 0). On failure msx_last_error() holds
      a sentence naming the file, tensor key or byte offset and, where one
      exists, a hint. The library never exits or aborts on bad input; files
      (checkpoints, images, JSON, logs) are parsed with bounds checks and size
      limits and are fuzzed (tests/fuzz).

   FILE FORMATS
      .pth/.pt   PyTorch zip serialisation (torch >= 1.6), read natively with
                 a pickle interpreter that executes nothing; flat state dicts
                 and {"model"|"model_state"|"state_dict": ...} wrappers;
                 prefixes module. sam. module.sam. _orig_mod. stripped;
                 float32/float16/bfloat16 storages, views and shared storage.
                 The legacy pre-zip format is refused with a re-save hint.
      .safetensors  read (memory-mapped) and written (atomically).
      plan JSON  {"format": "medsamix-plan-v1", "granularity": G, "groups":
                 {"<group id>": {"method": ..., params}}}.

   PREPROCESSING (explicit, never guessed from a file name)
      SAM (default)  longest side resized to the model's image size with
                     PIL-exact bilinear, (x - mean) / std, zero padding.
      MedSAM         square bicubic resize, min-max to [0, 1], no mean/std.

   VERSION HISTORY
      0.1.0 (2026-11-28)  first release: checkpoint I/O, SAM forward pass,
                          four merge methods, RF/EI/ParEGO optimiser, search.
*/
#ifndef MEDSAMIX_H
#define MEDSAMIX_H
#include "parts/core_api.h"
#ifndef MSX_SKIP_CKPT
#include "parts/ckpt_api.h"
#endif
#ifndef MSX_SKIP_SAM
#include "parts/sam_api.h"
#endif
#ifndef MSX_SKIP_IMAGE
#include "parts/image_api.h"
#endif
#ifndef MSX_SKIP_MERGE
#include "parts/merge_api.h"
#endif
#ifndef MSX_SKIP_OPT
#include "parts/opt_api.h"
#endif
#ifndef MSX_SKIP_SEARCH
#include "parts/search_api.h"
#endif
#endif /* MEDSAMIX_H */

#ifdef MEDSAMIX_IMPLEMENTATION
#ifndef MEDSAMIX_IMPLEMENTATION_DONE
#define MEDSAMIX_IMPLEMENTATION_DONE
#include "parts/core_impl.h"
#ifndef MSX_SKIP_CKPT
#include "parts/ckpt_impl.h"
#endif
#ifndef MSX_SKIP_SAM
#include "parts/sam_impl.h"
#endif
#ifndef MSX_SKIP_IMAGE
#include "parts/image_impl.h"
#endif
#ifndef MSX_SKIP_MERGE
#include "parts/merge_impl.h"
#endif
#ifndef MSX_SKIP_OPT
#include "parts/opt_impl.h"
#endif
#ifndef MSX_SKIP_SEARCH
#include "parts/search_impl.h"
#endif
#endif
#endif

/*
------------------------------------------------------------------------------
MIT License

Copyright (c) 2026 the medsamix.h authors

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
*/
