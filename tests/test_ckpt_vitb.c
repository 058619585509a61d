/* tests/test_ckpt_vitb.c - SAM ViT-B, -L and -H architectures inferred from key sets
   with the official shapes. The ViT-B table below is the state_dict of
   build_sam_vit_b (facebookresearch/segment-anything@dca509f
   segment_anything/build_sam.py), in its order, 314 keys; only shapes
   matter, so every tensor gets a 1-byte dummy buffer instead of 375 MB of
   zeros. ViT-L and -H are derived from that table by hand rules (below),
   not by the library's key generator. */
#define MEDSAMIX_IMPLEMENTATION
#include "../medsamix.h"
#include "test.h"

static const char *const vit_b[][2] = {
    {"image_encoder.pos_embed", "[1,64,64,768]"},
    {"image_encoder.patch_embed.proj.weight", "[768,3,16,16]"},
    {"image_encoder.patch_embed.proj.bias", "[768]"},
    {"image_encoder.blocks.0.norm1.weight", "[768]"},
    {"image_encoder.blocks.0.norm1.bias", "[768]"},
    {"image_encoder.blocks.0.attn.rel_pos_h", "[27,64]"},
    {"image_encoder.blocks.0.attn.rel_pos_w", "[27,64]"},
    {"image_encoder.blocks.0.attn.qkv.weight", "[2304,768]"},
    {"image_encoder.blocks.0.attn.qkv.bias", "[2304]"},
    {"image_encoder.blocks.0.attn.proj.weight", "[768,768]"},
    {"image_encoder.blocks.0.attn.proj.bias", "[768]"},
    {"image_encoder.blocks.0.norm2.weight", "[768]"},
    {"image_encoder.blocks.0.norm2.bias", "[768]"},
    {"image_encoder.blocks.0.mlp.lin1.weight", "[3072,768]"},
    {"image_encoder.blocks.0.mlp.lin1.bias", "[3072]"},
    {"image_encoder.blocks.0.mlp.lin2.weight", "[768,3072]"},
    {"image_encoder.blocks.0.mlp.lin2.bias", "[768]"},
    {"image_encoder.blocks.1.norm1.weight", "[768]"},
    {"image_encoder.blocks.1.norm1.bias", "[768]"},
    {"image_encoder.blocks.1.attn.rel_pos_h", "[27,64]"},
    {"image_encoder.blocks.1.attn.rel_pos_w", "[27,64]"},
    {"image_encoder.blocks.1.attn.qkv.weight", "[2304,768]"},
    {"image_encoder.blocks.1.attn.qkv.bias", "[2304]"},
    {"image_encoder.blocks.1.attn.proj.weight", "[768,768]"},
    {"image_encoder.blocks.1.attn.proj.bias", "[768]"},
    {"image_encoder.blocks.1.norm2.weight", "[768]"},
    {"image_encoder.blocks.1.norm2.bias", "[768]"},
    {"image_encoder.blocks.1.mlp.lin1.weight", "[3072,768]"},
    {"image_encoder.blocks.1.mlp.lin1.bias", "[3072]"},
    {"image_encoder.blocks.1.mlp.lin2.weight", "[768,3072]"},
    {"image_encoder.blocks.1.mlp.lin2.bias", "[768]"},
    {"image_encoder.blocks.2.norm1.weight", "[768]"},
    {"image_encoder.blocks.2.norm1.bias", "[768]"},
    {"image_encoder.blocks.2.attn.rel_pos_h", "[127,64]"},
    {"image_encoder.blocks.2.attn.rel_pos_w", "[127,64]"},
    {"image_encoder.blocks.2.attn.qkv.weight", "[2304,768]"},
    {"image_encoder.blocks.2.attn.qkv.bias", "[2304]"},
    {"image_encoder.blocks.2.attn.proj.weight", "[768,768]"},
    {"image_encoder.blocks.2.attn.proj.bias", "[768]"},
    {"image_encoder.blocks.2.norm2.weight", "[768]"},
    {"image_encoder.blocks.2.norm2.bias", "[768]"},
    {"image_encoder.blocks.2.mlp.lin1.weight", "[3072,768]"},
    {"image_encoder.blocks.2.mlp.lin1.bias", "[3072]"},
    {"image_encoder.blocks.2.mlp.lin2.weight", "[768,3072]"},
    {"image_encoder.blocks.2.mlp.lin2.bias", "[768]"},
    {"image_encoder.blocks.3.norm1.weight", "[768]"},
    {"image_encoder.blocks.3.norm1.bias", "[768]"},
    {"image_encoder.blocks.3.attn.rel_pos_h", "[27,64]"},
    {"image_encoder.blocks.3.attn.rel_pos_w", "[27,64]"},
    {"image_encoder.blocks.3.attn.qkv.weight", "[2304,768]"},
    {"image_encoder.blocks.3.attn.qkv.bias", "[2304]"},
    {"image_encoder.blocks.3.attn.proj.weight", "[768,768]"},
    {"image_encoder.blocks.3.attn.proj.bias", "[768]"},
    {"image_encoder.blocks.3.norm2.weight", "[768]"},
    {"image_encoder.blocks.3.norm2.bias", "[768]"},
    {"image_encoder.blocks.3.mlp.lin1.weight", "[3072,768]"},
    {"image_encoder.blocks.3.mlp.lin1.bias", "[3072]"},
    {"image_encoder.blocks.3.mlp.lin2.weight", "[768,3072]"},
    {"image_encoder.blocks.3.mlp.lin2.bias", "[768]"},
    {"image_encoder.blocks.4.norm1.weight", "[768]"},
    {"image_encoder.blocks.4.norm1.bias", "[768]"},
    {"image_encoder.blocks.4.attn.rel_pos_h", "[27,64]"},
    {"image_encoder.blocks.4.attn.rel_pos_w", "[27,64]"},
    {"image_encoder.blocks.4.attn.qkv.weight", "[2304,768]"},
    {"image_encoder.blocks.4.attn.qkv.bias", "[2304]"},
    {"image_encoder.blocks.4.attn.proj.weight", "[768,768]"},
    {"image_encoder.blocks.4.attn.proj.bias", "[768]"},
    {"image_encoder.blocks.4.norm2.weight", "[768]"},
    {"image_encoder.blocks.4.norm2.bias", "[768]"},
    {"image_encoder.blocks.4.mlp.lin1.weight", "[3072,768]"},
    {"image_encoder.blocks.4.mlp.lin1.bias", "[3072]"},
    {"image_encoder.blocks.4.mlp.lin2.weight", "[768,3072]"},
    {"image_encoder.blocks.4.mlp.lin2.bias", "[768]"},
    {"image_encoder.blocks.5.norm1.weight", "[768]"},
    {"image_encoder.blocks.5.norm1.bias", "[768]"},
    {"image_encoder.blocks.5.attn.rel_pos_h", "[127,64]"},
    {"image_encoder.blocks.5.attn.rel_pos_w", "[127,64]"},
    {"image_encoder.blocks.5.attn.qkv.weight", "[2304,768]"},
    {"image_encoder.blocks.5.attn.qkv.bias", "[2304]"},
    {"image_encoder.blocks.5.attn.proj.weight", "[768,768]"},
    {"image_encoder.blocks.5.attn.proj.bias", "[768]"},
    {"image_encoder.blocks.5.norm2.weight", "[768]"},
    {"image_encoder.blocks.5.norm2.bias", "[768]"},
    {"image_encoder.blocks.5.mlp.lin1.weight", "[3072,768]"},
    {"image_encoder.blocks.5.mlp.lin1.bias", "[3072]"},
    {"image_encoder.blocks.5.mlp.lin2.weight", "[768,3072]"},
    {"image_encoder.blocks.5.mlp.lin2.bias", "[768]"},
    {"image_encoder.blocks.6.norm1.weight", "[768]"},
    {"image_encoder.blocks.6.norm1.bias", "[768]"},
    {"image_encoder.blocks.6.attn.rel_pos_h", "[27,64]"},
    {"image_encoder.blocks.6.attn.rel_pos_w", "[27,64]"},
    {"image_encoder.blocks.6.attn.qkv.weight", "[2304,768]"},
    {"image_encoder.blocks.6.attn.qkv.bias", "[2304]"},
    {"image_encoder.blocks.6.attn.proj.weight", "[768,768]"},
    {"image_encoder.blocks.6.attn.proj.bias", "[768]"},
    {"image_encoder.blocks.6.norm2.weight", "[768]"},
    {"image_encoder.blocks.6.norm2.bias", "[768]"},
    {"image_encoder.blocks.6.mlp.lin1.weight", "[3072,768]"},
    {"image_encoder.blocks.6.mlp.lin1.bias", "[3072]"},
    {"image_encoder.blocks.6.mlp.lin2.weight", "[768,3072]"},
    {"image_encoder.blocks.6.mlp.lin2.bias", "[768]"},
    {"image_encoder.blocks.7.norm1.weight", "[768]"},
    {"image_encoder.blocks.7.norm1.bias", "[768]"},
    {"image_encoder.blocks.7.attn.rel_pos_h", "[27,64]"},
    {"image_encoder.blocks.7.attn.rel_pos_w", "[27,64]"},
    {"image_encoder.blocks.7.attn.qkv.weight", "[2304,768]"},
    {"image_encoder.blocks.7.attn.qkv.bias", "[2304]"},
    {"image_encoder.blocks.7.attn.proj.weight", "[768,768]"},
    {"image_encoder.blocks.7.attn.proj.bias", "[768]"},
    {"image_encoder.blocks.7.norm2.weight", "[768]"},
    {"image_encoder.blocks.7.norm2.bias", "[768]"},
    {"image_encoder.blocks.7.mlp.lin1.weight", "[3072,768]"},
    {"image_encoder.blocks.7.mlp.lin1.bias", "[3072]"},
    {"image_encoder.blocks.7.mlp.lin2.weight", "[768,3072]"},
    {"image_encoder.blocks.7.mlp.lin2.bias", "[768]"},
    {"image_encoder.blocks.8.norm1.weight", "[768]"},
    {"image_encoder.blocks.8.norm1.bias", "[768]"},
    {"image_encoder.blocks.8.attn.rel_pos_h", "[127,64]"},
    {"image_encoder.blocks.8.attn.rel_pos_w", "[127,64]"},
    {"image_encoder.blocks.8.attn.qkv.weight", "[2304,768]"},
    {"image_encoder.blocks.8.attn.qkv.bias", "[2304]"},
    {"image_encoder.blocks.8.attn.proj.weight", "[768,768]"},
    {"image_encoder.blocks.8.attn.proj.bias", "[768]"},
    {"image_encoder.blocks.8.norm2.weight", "[768]"},
    {"image_encoder.blocks.8.norm2.bias", "[768]"},
    {"image_encoder.blocks.8.mlp.lin1.weight", "[3072,768]"},
    {"image_encoder.blocks.8.mlp.lin1.bias", "[3072]"},
    {"image_encoder.blocks.8.mlp.lin2.weight", "[768,3072]"},
    {"image_encoder.blocks.8.mlp.lin2.bias", "[768]"},
    {"image_encoder.blocks.9.norm1.weight", "[768]"},
    {"image_encoder.blocks.9.norm1.bias", "[768]"},
    {"image_encoder.blocks.9.attn.rel_pos_h", "[27,64]"},
    {"image_encoder.blocks.9.attn.rel_pos_w", "[27,64]"},
    {"image_encoder.blocks.9.attn.qkv.weight", "[2304,768]"},
    {"image_encoder.blocks.9.attn.qkv.bias", "[2304]"},
    {"image_encoder.blocks.9.attn.proj.weight", "[768,768]"},
    {"image_encoder.blocks.9.attn.proj.bias", "[768]"},
    {"image_encoder.blocks.9.norm2.weight", "[768]"},
    {"image_encoder.blocks.9.norm2.bias", "[768]"},
    {"image_encoder.blocks.9.mlp.lin1.weight", "[3072,768]"},
    {"image_encoder.blocks.9.mlp.lin1.bias", "[3072]"},
    {"image_encoder.blocks.9.mlp.lin2.weight", "[768,3072]"},
    {"image_encoder.blocks.9.mlp.lin2.bias", "[768]"},
    {"image_encoder.blocks.10.norm1.weight", "[768]"},
    {"image_encoder.blocks.10.norm1.bias", "[768]"},
    {"image_encoder.blocks.10.attn.rel_pos_h", "[27,64]"},
    {"image_encoder.blocks.10.attn.rel_pos_w", "[27,64]"},
    {"image_encoder.blocks.10.attn.qkv.weight", "[2304,768]"},
    {"image_encoder.blocks.10.attn.qkv.bias", "[2304]"},
    {"image_encoder.blocks.10.attn.proj.weight", "[768,768]"},
    {"image_encoder.blocks.10.attn.proj.bias", "[768]"},
    {"image_encoder.blocks.10.norm2.weight", "[768]"},
    {"image_encoder.blocks.10.norm2.bias", "[768]"},
    {"image_encoder.blocks.10.mlp.lin1.weight", "[3072,768]"},
    {"image_encoder.blocks.10.mlp.lin1.bias", "[3072]"},
    {"image_encoder.blocks.10.mlp.lin2.weight", "[768,3072]"},
    {"image_encoder.blocks.10.mlp.lin2.bias", "[768]"},
    {"image_encoder.blocks.11.norm1.weight", "[768]"},
    {"image_encoder.blocks.11.norm1.bias", "[768]"},
    {"image_encoder.blocks.11.attn.rel_pos_h", "[127,64]"},
    {"image_encoder.blocks.11.attn.rel_pos_w", "[127,64]"},
    {"image_encoder.blocks.11.attn.qkv.weight", "[2304,768]"},
    {"image_encoder.blocks.11.attn.qkv.bias", "[2304]"},
    {"image_encoder.blocks.11.attn.proj.weight", "[768,768]"},
    {"image_encoder.blocks.11.attn.proj.bias", "[768]"},
    {"image_encoder.blocks.11.norm2.weight", "[768]"},
    {"image_encoder.blocks.11.norm2.bias", "[768]"},
    {"image_encoder.blocks.11.mlp.lin1.weight", "[3072,768]"},
    {"image_encoder.blocks.11.mlp.lin1.bias", "[3072]"},
    {"image_encoder.blocks.11.mlp.lin2.weight", "[768,3072]"},
    {"image_encoder.blocks.11.mlp.lin2.bias", "[768]"},
    {"image_encoder.neck.0.weight", "[256,768,1,1]"},
    {"image_encoder.neck.1.weight", "[256]"},
    {"image_encoder.neck.1.bias", "[256]"},
    {"image_encoder.neck.2.weight", "[256,256,3,3]"},
    {"image_encoder.neck.3.weight", "[256]"},
    {"image_encoder.neck.3.bias", "[256]"},
    {"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "[2,128]"},
    {"prompt_encoder.point_embeddings.0.weight", "[1,256]"},
    {"prompt_encoder.point_embeddings.1.weight", "[1,256]"},
    {"prompt_encoder.point_embeddings.2.weight", "[1,256]"},
    {"prompt_encoder.point_embeddings.3.weight", "[1,256]"},
    {"prompt_encoder.not_a_point_embed.weight", "[1,256]"},
    {"prompt_encoder.mask_downscaling.0.weight", "[4,1,2,2]"},
    {"prompt_encoder.mask_downscaling.0.bias", "[4]"},
    {"prompt_encoder.mask_downscaling.1.weight", "[4]"},
    {"prompt_encoder.mask_downscaling.1.bias", "[4]"},
    {"prompt_encoder.mask_downscaling.3.weight", "[16,4,2,2]"},
    {"prompt_encoder.mask_downscaling.3.bias", "[16]"},
    {"prompt_encoder.mask_downscaling.4.weight", "[16]"},
    {"prompt_encoder.mask_downscaling.4.bias", "[16]"},
    {"prompt_encoder.mask_downscaling.6.weight", "[256,16,1,1]"},
    {"prompt_encoder.mask_downscaling.6.bias", "[256]"},
    {"prompt_encoder.no_mask_embed.weight", "[1,256]"},
    {"mask_decoder.transformer.layers.0.self_attn.q_proj.weight", "[256,256]"},
    {"mask_decoder.transformer.layers.0.self_attn.q_proj.bias", "[256]"},
    {"mask_decoder.transformer.layers.0.self_attn.k_proj.weight", "[256,256]"},
    {"mask_decoder.transformer.layers.0.self_attn.k_proj.bias", "[256]"},
    {"mask_decoder.transformer.layers.0.self_attn.v_proj.weight", "[256,256]"},
    {"mask_decoder.transformer.layers.0.self_attn.v_proj.bias", "[256]"},
    {"mask_decoder.transformer.layers.0.self_attn.out_proj.weight", "[256,256]"},
    {"mask_decoder.transformer.layers.0.self_attn.out_proj.bias", "[256]"},
    {"mask_decoder.transformer.layers.0.norm1.weight", "[256]"},
    {"mask_decoder.transformer.layers.0.norm1.bias", "[256]"},
    {"mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.bias", "[128]"},
    {"mask_decoder.transformer.layers.0.cross_attn_token_to_image.k_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.layers.0.cross_attn_token_to_image.k_proj.bias", "[128]"},
    {"mask_decoder.transformer.layers.0.cross_attn_token_to_image.v_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.layers.0.cross_attn_token_to_image.v_proj.bias", "[128]"},
    {"mask_decoder.transformer.layers.0.cross_attn_token_to_image.out_proj.weight", "[256,128]"},
    {"mask_decoder.transformer.layers.0.cross_attn_token_to_image.out_proj.bias", "[256]"},
    {"mask_decoder.transformer.layers.0.norm2.weight", "[256]"},
    {"mask_decoder.transformer.layers.0.norm2.bias", "[256]"},
    {"mask_decoder.transformer.layers.0.mlp.lin1.weight", "[2048,256]"},
    {"mask_decoder.transformer.layers.0.mlp.lin1.bias", "[2048]"},
    {"mask_decoder.transformer.layers.0.mlp.lin2.weight", "[256,2048]"},
    {"mask_decoder.transformer.layers.0.mlp.lin2.bias", "[256]"},
    {"mask_decoder.transformer.layers.0.norm3.weight", "[256]"},
    {"mask_decoder.transformer.layers.0.norm3.bias", "[256]"},
    {"mask_decoder.transformer.layers.0.norm4.weight", "[256]"},
    {"mask_decoder.transformer.layers.0.norm4.bias", "[256]"},
    {"mask_decoder.transformer.layers.0.cross_attn_image_to_token.q_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.layers.0.cross_attn_image_to_token.q_proj.bias", "[128]"},
    {"mask_decoder.transformer.layers.0.cross_attn_image_to_token.k_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.layers.0.cross_attn_image_to_token.k_proj.bias", "[128]"},
    {"mask_decoder.transformer.layers.0.cross_attn_image_to_token.v_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.layers.0.cross_attn_image_to_token.v_proj.bias", "[128]"},
    {"mask_decoder.transformer.layers.0.cross_attn_image_to_token.out_proj.weight", "[256,128]"},
    {"mask_decoder.transformer.layers.0.cross_attn_image_to_token.out_proj.bias", "[256]"},
    {"mask_decoder.transformer.layers.1.self_attn.q_proj.weight", "[256,256]"},
    {"mask_decoder.transformer.layers.1.self_attn.q_proj.bias", "[256]"},
    {"mask_decoder.transformer.layers.1.self_attn.k_proj.weight", "[256,256]"},
    {"mask_decoder.transformer.layers.1.self_attn.k_proj.bias", "[256]"},
    {"mask_decoder.transformer.layers.1.self_attn.v_proj.weight", "[256,256]"},
    {"mask_decoder.transformer.layers.1.self_attn.v_proj.bias", "[256]"},
    {"mask_decoder.transformer.layers.1.self_attn.out_proj.weight", "[256,256]"},
    {"mask_decoder.transformer.layers.1.self_attn.out_proj.bias", "[256]"},
    {"mask_decoder.transformer.layers.1.norm1.weight", "[256]"},
    {"mask_decoder.transformer.layers.1.norm1.bias", "[256]"},
    {"mask_decoder.transformer.layers.1.cross_attn_token_to_image.q_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.layers.1.cross_attn_token_to_image.q_proj.bias", "[128]"},
    {"mask_decoder.transformer.layers.1.cross_attn_token_to_image.k_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.layers.1.cross_attn_token_to_image.k_proj.bias", "[128]"},
    {"mask_decoder.transformer.layers.1.cross_attn_token_to_image.v_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.layers.1.cross_attn_token_to_image.v_proj.bias", "[128]"},
    {"mask_decoder.transformer.layers.1.cross_attn_token_to_image.out_proj.weight", "[256,128]"},
    {"mask_decoder.transformer.layers.1.cross_attn_token_to_image.out_proj.bias", "[256]"},
    {"mask_decoder.transformer.layers.1.norm2.weight", "[256]"},
    {"mask_decoder.transformer.layers.1.norm2.bias", "[256]"},
    {"mask_decoder.transformer.layers.1.mlp.lin1.weight", "[2048,256]"},
    {"mask_decoder.transformer.layers.1.mlp.lin1.bias", "[2048]"},
    {"mask_decoder.transformer.layers.1.mlp.lin2.weight", "[256,2048]"},
    {"mask_decoder.transformer.layers.1.mlp.lin2.bias", "[256]"},
    {"mask_decoder.transformer.layers.1.norm3.weight", "[256]"},
    {"mask_decoder.transformer.layers.1.norm3.bias", "[256]"},
    {"mask_decoder.transformer.layers.1.norm4.weight", "[256]"},
    {"mask_decoder.transformer.layers.1.norm4.bias", "[256]"},
    {"mask_decoder.transformer.layers.1.cross_attn_image_to_token.q_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.layers.1.cross_attn_image_to_token.q_proj.bias", "[128]"},
    {"mask_decoder.transformer.layers.1.cross_attn_image_to_token.k_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.layers.1.cross_attn_image_to_token.k_proj.bias", "[128]"},
    {"mask_decoder.transformer.layers.1.cross_attn_image_to_token.v_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.layers.1.cross_attn_image_to_token.v_proj.bias", "[128]"},
    {"mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight", "[256,128]"},
    {"mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.bias", "[256]"},
    {"mask_decoder.transformer.final_attn_token_to_image.q_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.final_attn_token_to_image.q_proj.bias", "[128]"},
    {"mask_decoder.transformer.final_attn_token_to_image.k_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.final_attn_token_to_image.k_proj.bias", "[128]"},
    {"mask_decoder.transformer.final_attn_token_to_image.v_proj.weight", "[128,256]"},
    {"mask_decoder.transformer.final_attn_token_to_image.v_proj.bias", "[128]"},
    {"mask_decoder.transformer.final_attn_token_to_image.out_proj.weight", "[256,128]"},
    {"mask_decoder.transformer.final_attn_token_to_image.out_proj.bias", "[256]"},
    {"mask_decoder.transformer.norm_final_attn.weight", "[256]"},
    {"mask_decoder.transformer.norm_final_attn.bias", "[256]"},
    {"mask_decoder.iou_token.weight", "[1,256]"},
    {"mask_decoder.mask_tokens.weight", "[4,256]"},
    {"mask_decoder.output_upscaling.0.weight", "[256,64,2,2]"},
    {"mask_decoder.output_upscaling.0.bias", "[64]"},
    {"mask_decoder.output_upscaling.1.weight", "[64]"},
    {"mask_decoder.output_upscaling.1.bias", "[64]"},
    {"mask_decoder.output_upscaling.3.weight", "[64,32,2,2]"},
    {"mask_decoder.output_upscaling.3.bias", "[32]"},
    {"mask_decoder.output_hypernetworks_mlps.0.layers.0.weight", "[256,256]"},
    {"mask_decoder.output_hypernetworks_mlps.0.layers.0.bias", "[256]"},
    {"mask_decoder.output_hypernetworks_mlps.0.layers.1.weight", "[256,256]"},
    {"mask_decoder.output_hypernetworks_mlps.0.layers.1.bias", "[256]"},
    {"mask_decoder.output_hypernetworks_mlps.0.layers.2.weight", "[32,256]"},
    {"mask_decoder.output_hypernetworks_mlps.0.layers.2.bias", "[32]"},
    {"mask_decoder.output_hypernetworks_mlps.1.layers.0.weight", "[256,256]"},
    {"mask_decoder.output_hypernetworks_mlps.1.layers.0.bias", "[256]"},
    {"mask_decoder.output_hypernetworks_mlps.1.layers.1.weight", "[256,256]"},
    {"mask_decoder.output_hypernetworks_mlps.1.layers.1.bias", "[256]"},
    {"mask_decoder.output_hypernetworks_mlps.1.layers.2.weight", "[32,256]"},
    {"mask_decoder.output_hypernetworks_mlps.1.layers.2.bias", "[32]"},
    {"mask_decoder.output_hypernetworks_mlps.2.layers.0.weight", "[256,256]"},
    {"mask_decoder.output_hypernetworks_mlps.2.layers.0.bias", "[256]"},
    {"mask_decoder.output_hypernetworks_mlps.2.layers.1.weight", "[256,256]"},
    {"mask_decoder.output_hypernetworks_mlps.2.layers.1.bias", "[256]"},
    {"mask_decoder.output_hypernetworks_mlps.2.layers.2.weight", "[32,256]"},
    {"mask_decoder.output_hypernetworks_mlps.2.layers.2.bias", "[32]"},
    {"mask_decoder.output_hypernetworks_mlps.3.layers.0.weight", "[256,256]"},
    {"mask_decoder.output_hypernetworks_mlps.3.layers.0.bias", "[256]"},
    {"mask_decoder.output_hypernetworks_mlps.3.layers.1.weight", "[256,256]"},
    {"mask_decoder.output_hypernetworks_mlps.3.layers.1.bias", "[256]"},
    {"mask_decoder.output_hypernetworks_mlps.3.layers.2.weight", "[32,256]"},
    {"mask_decoder.output_hypernetworks_mlps.3.layers.2.bias", "[32]"},
    {"mask_decoder.iou_prediction_head.layers.0.weight", "[256,256]"},
    {"mask_decoder.iou_prediction_head.layers.0.bias", "[256]"},
    {"mask_decoder.iou_prediction_head.layers.1.weight", "[256,256]"},
    {"mask_decoder.iou_prediction_head.layers.1.bias", "[256]"},
    {"mask_decoder.iou_prediction_head.layers.2.weight", "[4,256]"},
    {"mask_decoder.iou_prediction_head.layers.2.bias", "[4]"},
};

static int parse_shape(const char *s, int64_t *shape) {
    int nd = 0;
    if (*s++ != '[') return -1;
    while (*s && *s != ']' && nd < MSX_MAX_DIMS) {
        shape[nd++] = strtoll(s, (char **)&s, 10);
        if (*s == ',') s++;
    }
    return nd;
}

/* A checkpoint with the given names/shapes and no real data. */
static msx_checkpoint *shapes_only(int n, const char *const *names, const int *nds, const int64_t (*shapes)[MSX_MAX_DIMS]) {
    msx_checkpoint *c = msx_ckpt_new();
    int i;
    for (i = 0; i < n; i++) {
        void *dummy = msx__aligned_alloc(1);
        if (msx__ckpt_add_owned(c, names[i], MSX_F32, nds[i], shapes[i], dummy, NULL) != MSX_OK) {
            msx__aligned_free(dummy);
            MSX_CHECK(0, "cannot add %s: %s", names[i], msx_last_error());
        }
    }
    return c;
}

static void check_arch_equal(const msx_sam_arch *a, const msx_sam_arch *b, const char *label) {
    char *ja = NULL, *jb = NULL;
    msx_sam_arch_to_json(a, &ja);
    msx_sam_arch_to_json(b, &jb);
    MSX_CHECK(ja && jb && !strcmp(ja, jb), "%s:\n got  %s\n want %s", label, ja ? ja : "", jb ? jb : "");
    msx_free(ja);
    msx_free(jb);
}

static void test_vit_b(void) {
    enum { N = sizeof vit_b / sizeof vit_b[0] };
    static const char *names[N];
    static int nds[N];
    static int64_t shapes[N][MSX_MAX_DIMS];
    msx_checkpoint *c;
    msx_sam_arch a, want;
    int i, k, same = 1;
    int64_t total = 0;
    for (i = 0; i < N; i++) {
        names[i] = vit_b[i][0];
        nds[i] = parse_shape(vit_b[i][1], shapes[i]);
    }
    c = shapes_only(N, names, nds, (const int64_t(*)[MSX_MAX_DIMS])shapes);
    MSX_CHECK(c->n == 314, "%d tensors", c->n);
    MSX_CHECK_OK(msx_sam_arch_infer(c, &a));
    /* segment-anything build_sam.py, build_sam_vit_b: embed 768, depth 12,
       heads 12, global attention at 2, 5, 8, 11; window 14, 1024 px, patch 16,
       prompt dim 256, mask_in_chans 16, TwoWayTransformer(2, 256, 2048, 8),
       3 multimask outputs, IoU head depth 3 hidden 256. */
    MSX_CHECK(a.img_size == 1024 && a.patch_size == 16 && a.in_chans == 3, "image %d patch %d", a.img_size, a.patch_size);
    MSX_CHECK(a.embed_dim == 768 && a.depth == 12 && a.num_heads == 12 && a.mlp_dim == 3072, "encoder %d %d %d %d", a.embed_dim, a.depth, a.num_heads, a.mlp_dim);
    MSX_CHECK(a.window_size == 14 && a.n_global == 4 && a.global_idx[0] == 2 && a.global_idx[1] == 5 && a.global_idx[2] == 8 && a.global_idx[3] == 11, "window/global");
    MSX_CHECK(a.rel_pos_len_win == 27 && a.rel_pos_len_glob == 127 && a.abs_pos_size == 64, "rel pos rows");
    MSX_CHECK(a.out_chans == 256 && a.prompt_dim == 256 && a.mask_in_chans == 16, "prompt");
    MSX_CHECK(a.dec_depth == 2 && a.dec_dim == 256 && a.dec_mlp_dim == 2048 && a.dec_heads == 8 && a.dec_downsample == 2, "decoder");
    MSX_CHECK(a.num_mask_tokens == 4 && a.iou_head_depth == 3 && a.iou_head_hidden == 256, "heads");
    msx_sam_arch_default(&want);
    check_arch_equal(&a, &want, "ViT-B inferred vs default");
    MSX_CHECK_OK(msx_sam_validate(c, &a));
    /* The generator reproduces the official list, in order. */
    MSX_CHECK(msx_sam_key_count(&a) == N, "key count %d", msx_sam_key_count(&a));
    for (i = 0; i < N && same; i++) {
        char nm[128];
        int nd;
        int64_t sh[MSX_MAX_DIMS], numel = 1;
        same = msx_sam_key_at(&a, i, nm, sizeof nm, &nd, sh) == MSX_OK && !strcmp(nm, names[i]) && nd == nds[i];
        for (k = 0; same && k < nd; k++) { same = sh[k] == shapes[i][k]; numel *= sh[k]; }
        total += numel;
    }
    MSX_CHECK(same, "generated key %d differs from the official ViT-B list (%s)", i - 1, names[i - 1]);
    MSX_CHECK(total == 93735728, "ViT-B elements %lld, the official state_dict has 93,735,728", (long long)total);
    /* Reverse the order; canonical order restores the official one. */
    for (i = 0; i < N / 2; i++) { msx_tensor t = c->tensors[i]; c->tensors[i] = c->tensors[N - 1 - i]; c->tensors[N - 1 - i] = t; }
    msx__ckpt_reindex(c);
    MSX_CHECK_OK(msx_sam_canonical_order(c, &a));
    for (i = 0, same = 1; i < N && same; i++) same = !strcmp(c->tensors[i].name, names[i]) && msx_ckpt_find(c, names[i]) == &c->tensors[i];
    MSX_CHECK(same, "canonical order wrong at %d", i - 1);
    /* One tensor missing, one with a wrong shape. */
    {
        unsigned char keep[N];
        memset(keep, 1, sizeof keep);
        keep[100] = 0;
        msx_ckpt_filter(c, keep);
        MSX_CHECK(msx_sam_validate(c, &a) == MSX_E_KEY_MISMATCH && strstr(msx_last_error(), names[100]), "missing: %s", msx_last_error());
        MSX_CHECK(msx_sam_arch_infer(c, &a) != MSX_OK || msx_sam_validate(c, &a) != MSX_OK, "filtered checkpoint validates");
    }
    msx_ckpt_free(c);
    for (i = 0; i < N; i++) nds[i] = parse_shape(vit_b[i][1], shapes[i]);
    shapes[5][0] = 29; /* blocks.0.attn.rel_pos_h */
    c = shapes_only(N, names, nds, (const int64_t(*)[MSX_MAX_DIMS])shapes);
    msx_sam_arch_default(&a);
    MSX_CHECK(msx_sam_validate(c, &a) == MSX_E_SHAPE && strstr(msx_last_error(), names[5]) && strstr(msx_last_error(), "[29, 64]") && strstr(msx_last_error(), "[27, 64]"), "shape: %s", msx_last_error());
    msx_ckpt_free(c);
}

/* ViT-L / ViT-H key sets written from build_sam.py (build_sam_vit_l: embed
   1024, depth 24, 16 heads, global attention at 5, 11, 17, 23; vit_h: 1280,
   32, 16, at 7, 15, 23, 31) and modeling/image_encoder.py: every
   image_encoder.blocks.0.* row of the ViT-B table is repeated for each
   block with E = embed dim, head dim E / 16, rel_pos rows 2 * 14 - 1 = 27
   (windowed) or 2 * 64 - 1 = 127 (global), qkv [3E, E], proj [E, E], mlp
   [4E, E] and [E, 4E]; pos_embed [1, 64, 64, E], patch_embed [E, 3, 16, 16],
   neck.0 [256, E, 1, 1]; the prompt encoder and mask decoder rows are the
   ViT-B ones. The library's arch inference, validation and key generator
   must all agree with it. */
static int vit_lh_keys(int E, int depth, const int *glob, char (*names)[128], int *nds, int64_t (*shapes)[MSX_MAX_DIMS]) {
    enum { NB = sizeof vit_b / sizeof vit_b[0] };
    int i, blk, n = 0, hd = E / 16;
    for (i = 0; i < NB; i++) {
        const char *k = vit_b[i][0];
        int64_t *sh = shapes[n];
        if (!strncmp(k, "image_encoder.blocks.", 21) && strncmp(k, "image_encoder.blocks.0.", 23)) continue;
        if (!strncmp(k, "image_encoder.blocks.0.", 23)) {
            if (strcmp(k, "image_encoder.blocks.0.norm1.weight")) continue; /* the block is written at its first row */
            for (blk = 0; blk < depth; blk++) {
                static const char *const part[14] = {"norm1.weight", "norm1.bias", "attn.rel_pos_h", "attn.rel_pos_w",
                                                     "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                                                     "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.lin1.weight",
                                                     "mlp.lin1.bias", "mlp.lin2.weight", "mlp.lin2.bias"};
                int p, g = blk == glob[0] || blk == glob[1] || blk == glob[2] || blk == glob[3];
                for (p = 0; p < 14; p++) {
                    int64_t *s2 = shapes[n];
                    snprintf(names[n], 128, "image_encoder.blocks.%d.%s", blk, part[p]);
                    nds[n] = 1;
                    switch (p) {
                    case 2: case 3: nds[n] = 2; s2[0] = g ? 127 : 27; s2[1] = hd; break;
                    case 4: nds[n] = 2; s2[0] = 3 * E; s2[1] = E; break;
                    case 5: s2[0] = 3 * E; break;
                    case 6: nds[n] = 2; s2[0] = E; s2[1] = E; break;
                    case 10: nds[n] = 2; s2[0] = 4 * E; s2[1] = E; break;
                    case 11: s2[0] = 4 * E; break;
                    case 12: nds[n] = 2; s2[0] = E; s2[1] = 4 * E; break;
                    default: s2[0] = E; break;
                    }
                    n++;
                }
            }
            continue;
        }
        snprintf(names[n], 128, "%s", k);
        nds[n] = parse_shape(vit_b[i][1], sh);
        if (!strcmp(k, "image_encoder.pos_embed")) sh[3] = E;
        else if (!strcmp(k, "image_encoder.patch_embed.proj.weight") || !strcmp(k, "image_encoder.patch_embed.proj.bias"))
            sh[0] = E;
        else if (!strcmp(k, "image_encoder.neck.0.weight")) sh[1] = E;
        n++;
    }
    return n;
}

static void test_vit_lh(void) {
    static const int cfg[2][3] = {{1024, 24, 16}, {1280, 32, 16}};
    static const int glob[2][4] = {{5, 11, 17, 23}, {7, 15, 23, 31}};
    /* Σ numel: the models' parameter counts (312,342,832 and 641,090,608, as
       sum(p.numel() for p in sam.parameters()) reports them) plus the 256-element
       positional-encoding buffer that state_dict() also holds */
    static const int64_t elems[2] = {312342832 + 256, 641090608 + 256};
    int v;
    for (v = 0; v < 2; v++) {
        msx_sam_arch got;
        int n, i, k, same = 1;
        const char **names = (const char **)malloc(800 * sizeof *names);
        int *nds = (int *)malloc(800 * sizeof *nds);
        int64_t(*shapes)[MSX_MAX_DIMS] = (int64_t(*)[MSX_MAX_DIMS])calloc(800, sizeof *shapes), total = 0;
        char(*buf)[128] = (char(*)[128])malloc(800 * sizeof *buf);
        msx_checkpoint *c;
        n = vit_lh_keys(cfg[v][0], cfg[v][1], glob[v], buf, nds, shapes);
        MSX_CHECK(n == 314 + 14 * (cfg[v][1] - 12), "ViT-%c list has %d keys", v ? 'H' : 'L', n);
        for (i = 0; i < n; i++) {
            int64_t e = 1;
            names[i] = buf[i];
            for (k = 0; k < nds[i]; k++) e *= shapes[i][k];
            total += e;
        }
        MSX_CHECK(total == elems[v], "ViT-%c: %lld elements, want %lld", v ? 'H' : 'L', (long long)total,
                  (long long)elems[v]);
        c = shapes_only(n, names, nds, (const int64_t(*)[MSX_MAX_DIMS])shapes);
        MSX_CHECK_OK(msx_sam_arch_infer(c, &got));
        MSX_CHECK(got.embed_dim == cfg[v][0] && got.depth == cfg[v][1] && got.num_heads == cfg[v][2] &&
                      got.mlp_dim == 4 * cfg[v][0] && got.window_size == 14 && got.n_global == 4,
                  "ViT-%c: embed %d depth %d heads %d mlp %d", v ? 'H' : 'L', got.embed_dim, got.depth, got.num_heads,
                  got.mlp_dim);
        for (k = 0; k < 4; k++)
            MSX_CHECK(got.global_idx[k] == glob[v][k], "ViT-%c global block %d: %d", v ? 'H' : 'L', k, got.global_idx[k]);
        MSX_CHECK_OK(msx_sam_validate(c, &got));
        /* the generator gives the same list, in order */
        MSX_CHECK(msx_sam_key_count(&got) == n, "ViT-%c generator count %d", v ? 'H' : 'L', msx_sam_key_count(&got));
        for (i = 0; i < n && same; i++) {
            char nm[128];
            int nd;
            int64_t sh[MSX_MAX_DIMS];
            same = msx_sam_key_at(&got, i, nm, sizeof nm, &nd, sh) == MSX_OK && !strcmp(nm, names[i]) && nd == nds[i];
            for (k = 0; same && k < nd; k++) same = sh[k] == shapes[i][k];
        }
        MSX_CHECK(same, "ViT-%c generated key %d differs (%s)", v ? 'H' : 'L', i - 1, names[i - 1]);
        msx_ckpt_free(c);
        free((void *)names); free(nds); free(shapes); free(buf);
    }
}

int main(void) {
    test_vit_b();
    test_vit_lh();
    return msx_test_summary("test_ckpt_vitb");
}
