/* medsamix.h - development shell: the sections live in parts/ until they are
   amalgamated into this single file. */
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
