//! Avro enums in Arrow are `Dictionary<Int32, Utf8>` columns whose dictionary must be exactly
//! the enum's symbol list, in order: that is what the Avro encoder writes as the symbol index.
//! Concatenating batches decoded from different writers, or a stage's filter and cast, can leave
//! a column with a merged, repeated or partial dictionary. [`conform`] rebuilds such columns on
//! the symbol list a template schema declares (field metadata `avro.enum.symbols`), recursing
//! into structs, lists, maps and unions; columns already in that form are returned as they are.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, DictionaryArray, Int32Array, ListArray, MapArray, RecordBatch,
    StringArray, StructArray, UnionArray,
};
use arrow::datatypes::{DataType, Field, Int32Type, SchemaRef};
use arrow::error::ArrowError;
use arrow_avro::schema::AVRO_ENUM_SYMBOLS_METADATA_KEY;

/// `batch` with every enum column on the symbol list `template` declares for it. Columns are
/// matched by position; `template` must have the batch's column count.
pub fn conform(batch: RecordBatch, template: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    if template.fields().len() != batch.num_columns() {
        return Err(ArrowError::SchemaError(format!(
            "batch has {} columns, the schema {}",
            batch.num_columns(),
            template.fields().len()
        )));
    }
    let mut changed = false;
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in template.fields().iter().zip(batch.columns()) {
        let conformed = conform_array(field, column)?;
        changed |= !Arc::ptr_eq(&conformed, column);
        columns.push(conformed);
    }
    if !changed {
        return Ok(batch);
    }
    // Conforming keeps every column's data type, so the batch's own schema still holds.
    RecordBatch::try_new(batch.schema(), columns)
}

fn symbols_of(field: &Field) -> Result<Option<Vec<String>>, ArrowError> {
    let Some(text) = field.metadata().get(AVRO_ENUM_SYMBOLS_METADATA_KEY) else {
        return Ok(None);
    };
    serde_json::from_str(text).map(Some).map_err(|e| {
        ArrowError::SchemaError(format!(
            "field {}: {AVRO_ENUM_SYMBOLS_METADATA_KEY} is not a list of strings: {e}",
            field.name()
        ))
    })
}

fn conform_array(field: &Field, array: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    match (field.data_type(), array.data_type()) {
        (DataType::Dictionary(_, _), DataType::Dictionary(key, value))
            if **key == DataType::Int32 && **value == DataType::Utf8 =>
        {
            match symbols_of(field)? {
                Some(symbols) => conform_dictionary(field.name(), &symbols, array),
                None => Ok(array.clone()),
            }
        }
        (DataType::Struct(fields), DataType::Struct(_)) => {
            let array = array.as_struct();
            if fields.len() != array.num_columns() {
                return Ok(Arc::new(array.clone()));
            }
            let mut changed = false;
            let mut children = Vec::with_capacity(fields.len());
            for (child_field, child) in fields.iter().zip(array.columns()) {
                let conformed = conform_array(child_field, child)?;
                changed |= !Arc::ptr_eq(&conformed, child);
                children.push(conformed);
            }
            if !changed {
                return Ok(Arc::new(array.clone()));
            }
            let child_fields = match array.data_type() {
                DataType::Struct(own) => own.clone(),
                _ => fields.clone(),
            };
            Ok(Arc::new(StructArray::try_new(
                child_fields,
                children,
                array.nulls().cloned(),
            )?))
        }
        (DataType::List(item), DataType::List(own)) => {
            let list = array.as_list::<i32>();
            let values = conform_array(item, list.values())?;
            if Arc::ptr_eq(&values, list.values()) {
                return Ok(array.clone());
            }
            Ok(Arc::new(ListArray::try_new(
                own.clone(),
                list.offsets().clone(),
                values,
                list.nulls().cloned(),
            )?))
        }
        (DataType::Map(entries, _), DataType::Map(own, sorted)) => {
            let map = array.as_map();
            let entries_array: ArrayRef = Arc::new(map.entries().clone());
            let conformed = conform_array(entries, &entries_array)?;
            if Arc::ptr_eq(&conformed, &entries_array) {
                return Ok(array.clone());
            }
            Ok(Arc::new(MapArray::try_new(
                own.clone(),
                map.offsets().clone(),
                conformed.as_struct().clone(),
                map.nulls().cloned(),
                *sorted,
            )?))
        }
        (DataType::Union(fields, _), DataType::Union(own, _)) => {
            let union = array
                .as_any()
                .downcast_ref::<UnionArray>()
                .ok_or_else(|| ArrowError::SchemaError("expected a union array".into()))?;
            let mut changed = false;
            let mut children = Vec::with_capacity(own.len());
            for (type_id, _) in own.iter() {
                let child = union.child(type_id);
                let template = fields.iter().find(|(id, _)| *id == type_id);
                let conformed = match template {
                    Some((_, child_field)) => conform_array(child_field, child)?,
                    None => child.clone(),
                };
                changed |= !Arc::ptr_eq(&conformed, child);
                children.push(conformed);
            }
            if !changed {
                return Ok(array.clone());
            }
            let (own_fields, type_ids, offsets, _) = union.clone().into_parts();
            Ok(Arc::new(UnionArray::try_new(
                own_fields, type_ids, offsets, children,
            )?))
        }
        _ => Ok(array.clone()),
    }
}

/// A dictionary column re-keyed onto `symbols`; a value that is not a symbol is an error.
fn conform_dictionary(
    name: &str,
    symbols: &[String],
    array: &ArrayRef,
) -> Result<ArrayRef, ArrowError> {
    let dictionary = array
        .as_any()
        .downcast_ref::<DictionaryArray<Int32Type>>()
        .ok_or_else(|| ArrowError::SchemaError(format!("{name}: expected Dictionary<Int32>")))?;
    let values = dictionary.values().as_string::<i32>();
    let same = values.len() == symbols.len()
        && values.null_count() == 0
        && values
            .iter()
            .zip(symbols)
            .all(|(v, s)| v == Some(s.as_str()));
    if same {
        return Ok(array.clone());
    }
    let index: HashMap<&str, i32> = symbols
        .iter()
        .enumerate()
        .map(|(i, s)| (s.as_str(), i as i32))
        .collect();
    // Where each dictionary entry goes in the symbol list; an entry no row uses may be anything.
    let mut remap: Vec<Option<i32>> = Vec::with_capacity(values.len());
    for value in values.iter() {
        remap.push(value.and_then(|v| index.get(v).copied()));
    }
    let keys = dictionary.keys();
    let mut new_keys = Vec::with_capacity(keys.len());
    for row in 0..keys.len() {
        if keys.is_null(row) {
            new_keys.push(None);
            continue;
        }
        let key = keys.value(row);
        let mapped = usize::try_from(key)
            .ok()
            .and_then(|k| remap.get(k).copied().flatten());
        match mapped {
            Some(symbol) => new_keys.push(Some(symbol)),
            None => {
                let value = usize::try_from(key)
                    .ok()
                    .filter(|k| *k < values.len() && values.is_valid(*k))
                    .map(|k| values.value(k).to_string())
                    .unwrap_or_default();
                return Err(ArrowError::InvalidArgumentError(format!(
                    "{name}: '{value}' is not a symbol of the enum {symbols:?}"
                )));
            }
        }
    }
    let symbols: StringArray = symbols.iter().map(|s| Some(s.as_str())).collect();
    Ok(Arc::new(DictionaryArray::<Int32Type>::try_new(
        Int32Array::from(new_keys),
        Arc::new(symbols),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::Schema;
    use std::collections::HashMap as Map;

    fn enum_field(name: &str, symbols: &[&str]) -> Field {
        Field::new(
            name,
            DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
            true,
        )
        .with_metadata(Map::from([(
            AVRO_ENUM_SYMBOLS_METADATA_KEY.to_string(),
            serde_json::to_string(symbols).expect("json"),
        )]))
    }

    fn dictionary(keys: Vec<Option<i32>>, values: &[&str]) -> ArrayRef {
        Arc::new(
            DictionaryArray::<Int32Type>::try_new(
                Int32Array::from(keys),
                Arc::new(StringArray::from(values.to_vec())),
            )
            .expect("dictionary"),
        )
    }

    fn strings(array: &ArrayRef) -> Vec<Option<String>> {
        let dictionary = array
            .as_any()
            .downcast_ref::<DictionaryArray<Int32Type>>()
            .expect("dictionary");
        let values = dictionary.values().as_string::<i32>();
        dictionary
            .keys()
            .iter()
            .map(|k| k.map(|k| values.value(k as usize).to_string()))
            .collect()
    }

    #[test]
    fn a_merged_dictionary_is_rekeyed_onto_the_symbols_and_values_are_kept() {
        let field = enum_field("level", &["LOW", "MID", "HIGH"]);
        let schema = Arc::new(Schema::new(vec![field]));
        // What concatenation leaves: repeated and reordered entries.
        let column = dictionary(
            vec![Some(0), Some(3), None, Some(1), Some(2)],
            &["HIGH", "LOW", "HIGH", "MID"],
        );
        let before = strings(&column);
        let batch = RecordBatch::try_new(schema.clone(), vec![column]).expect("batch");
        let out = conform(batch, &schema).expect("conforms");
        let column = out.column(0);
        assert_eq!(strings(column), before);
        let dictionary = column.as_dictionary::<Int32Type>();
        let values: Vec<_> = dictionary.values().as_string::<i32>().iter().collect();
        assert_eq!(values, vec![Some("LOW"), Some("MID"), Some("HIGH")]);
    }

    #[test]
    fn an_enum_inside_a_struct_of_a_list_is_conformed() {
        let item = Field::new(
            "item",
            DataType::Struct(vec![enum_field("level", &["A", "B"])].into()),
            true,
        );
        let list_field = Field::new("items", DataType::List(Arc::new(item.clone())), true);
        let schema = Arc::new(Schema::new(vec![list_field]));
        let levels = dictionary(vec![Some(0), Some(0), Some(1)], &["B", "A"]);
        let DataType::Struct(struct_fields) = item.data_type() else {
            unreachable!()
        };
        let structs = StructArray::try_new(struct_fields.clone(), vec![levels], None).expect("s");
        let list = ListArray::try_new(
            Arc::new(item),
            arrow::buffer::OffsetBuffer::from_lengths([2, 1]),
            Arc::new(structs),
            None,
        )
        .expect("list");
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(list)]).expect("batch");
        let out = conform(batch, &schema).expect("conforms");
        let list = out.column(0).as_list::<i32>();
        let levels = list.values().as_struct().column(0).clone();
        assert_eq!(
            strings(&levels),
            vec![Some("B".into()), Some("B".into()), Some("A".into())]
        );
        let values: Vec<_> = levels
            .as_dictionary::<Int32Type>()
            .values()
            .as_string::<i32>()
            .iter()
            .collect();
        assert_eq!(values, vec![Some("A"), Some("B")]);
    }

    #[test]
    fn a_value_that_is_no_symbol_is_an_error_naming_it() {
        let field = enum_field("level", &["LOW"]);
        let schema = Arc::new(Schema::new(vec![field]));
        let column = dictionary(vec![Some(0)], &["NOPE"]);
        let batch = RecordBatch::try_new(schema.clone(), vec![column]).expect("batch");
        let error = conform(batch, &schema).expect_err("refused");
        assert!(error.to_string().contains("'NOPE'"), "{error}");
    }
}
